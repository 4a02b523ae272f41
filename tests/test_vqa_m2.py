"""VQA over M2-Encoder's multiway towers (issue #34 item 2: "M2's multiway towers where they fit"): BEiT-3's
vision-language mode, image and question in one sequence, each token in its own branch."""
import json
from pathlib import Path

import pytest
import torch

from polymodal.models.factory import create_model


@pytest.fixture(scope="module")
def qa_world(tmp_path_factory):
    from polymodal.data.synthetic.shapes_qa import generate_shapes_qa
    root = tmp_path_factory.mktemp("m2_qa")
    generate_shapes_qa(root, n_train=32, n_test=0, n_val=8, seed=4, progress=False, workers=1)
    return root


@pytest.fixture(scope="module")
def m2():
    from polymodal.data.text import train_tokenizer
    tok = train_tokenizer(["what colour is the star red blue how many 1 2 3"] * 5, vocab_size=200)
    torch.manual_seed(0)
    return create_model("m2-tiny", tokenizer=tok).eval()


def test_the_joint_pass_routes_each_token_through_its_branch_and_attends_across(m2):
    pixels = torch.randn(2, 3, m2.config.vision.image_size, m2.config.vision.image_size)
    ids = m2.tokenizer(["what colour is the star?", "how many?"])
    tokens = m2.qa_visual_tokens(pixels[:, None])[:, 0]                    # (B, 1+P, W)
    out = m2.qa_fuse(ids, tokens)
    assert out.shape == (2, m2.qa_width)
    # the pooled image CLS depends on the question (one self-attention over both modalities) ...
    other = m2.qa_fuse(m2.tokenizer(["how many?", "what colour is the star?"]), tokens)
    assert not torch.allclose(out, other)
    # ... and the text tokens go through the text branch: changing only its weights changes the output
    with torch.no_grad():
        m2.stage1.blocks[0].branches["text"].fc2.weight.mul_(2.0)
    try:
        assert not torch.allclose(m2.qa_fuse(ids, tokens), out)
    finally:
        with torch.no_grad():
            m2.stage1.blocks[0].branches["text"].fc2.weight.div_(2.0)
    assert torch.allclose(m2.qa_fuse(ids, tokens), out)


def test_m2_refuses_video_questions(m2):
    from polymodal.models.vqa import VQAModel
    with pytest.raises(ValueError, match="M2-Encoder's joint pass reads one image .* set vqa.media: image"):
        VQAModel(m2, ["red", "blue"], num_frames=4)


def test_method_vqa_trains_on_an_m2_encoder_and_the_saved_model_reproduces_it(qa_world, tmp_path):
    from polymodal.hub import load_model
    from polymodal.eval.vqa import vqa_task
    from polymodal.train.run import load_recipe, run_recipe
    out = tmp_path / "run"
    cfg = load_recipe(Path(__file__).parents[1] / "recipes/vqa_shapes.yaml", [
        f"out_dir={out}", "model.name=m2-tiny", "model.overrides={}",
        f"data.train={qa_world / 'train.jsonl'}", "data.batch_size=8", "train.steps=4", "train.eval_every=0",
        "train.ckpt_every=0", "train.progress=false", "train.threads=1", "train.report=false", "optim.warmup_steps=1",
        f"eval.tasks=[{{task: vqa, data: {qa_world / 'val.jsonl'}, }}]"])
    final = run_recipe(cfg)
    saved = load_model(out / "model").eval()
    assert type(saved.base).__name__ == "M2Encoder" and json.loads((out / "model" / "config.json").read_text())[
        "base"]["model_type"] == "m2"
    again = vqa_task(saved, qa_world / "val.jsonl")
    assert again["vqa_accuracy"] == pytest.approx(final["eval/vqa/vqa_accuracy"], abs=1e-6)
