"""Video QA on SNP-S3's fusion encoder (issue #34 item 2): a saved SNP-S3 run is the base of `method: vqa` with
`vqa.media: video`; the answer head reads the cross pooler's output of `[CLS question SEP ; clips ; SEP]`. Tiny
configs (width 32, 2 layers, a few dozen videos); the benchmark's smoke run is marked slow."""
import json
from pathlib import Path

import pytest
import torch

import polymodal
from reproduce import assert_eval_reproduces

REPO = Path(__file__).resolve().parents[1]
TINY_SNPS3 = ["snps3.vision={image_size: 32, patch_size: 8, width: 32, layers: 2, heads: 2}",
              "snps3.text={width: 32, layers: 2, heads: 2, context_length: 30}", "tokenizer.vocab_size=256"]
QUIET = ["train.eval_every=0", "train.ckpt_every=0", "train.progress=false", "train.threads=1", "train.report=false",
         "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def qa(moving_world, tmp_path_factory):
    """(world, QA folder) of a tiny MovingShapes world with compound actions."""
    from polymodal.data.synthetic.moving_qa import generate_moving_qa
    world = moving_world(n_train=24, n_test=6, seed=5, num_frames=4, compound_fraction=0.4)
    out = tmp_path_factory.mktemp("snps3_qa")
    generate_moving_qa(world, out)
    return world, out


@pytest.fixture(scope="module")
def snps3_base(qa, tmp_path_factory):
    """A tiny SNP-S3 run (recipes/snps3_full.yaml, 2 steps): its saved model folder."""
    from polymodal.train.run import load_recipe, run_recipe
    world, _ = qa
    out = tmp_path_factory.mktemp("snps3_pre") / "run"
    run_recipe(load_recipe(REPO / "recipes/snps3_full.yaml",
                           [f"out_dir={out}", f"data.train={world / 'train.jsonl'}", "data.batch_size=8",
                            "train.steps=2", "eval.tasks=[]", *TINY_SNPS3, *QUIET]))
    return out / "model"


def _vqa_overrides(qa_dir: Path, out: Path, base: Path, steps: int) -> list[str]:
    return [f"out_dir={out}", f"model.path={base}", f"data.train={qa_dir / 'train.jsonl'}", "data.batch_size=8",
            f"train.steps={steps}", f"eval.tasks=[{{task: vqa, data: {qa_dir / 'test.jsonl'}}}]", *QUIET]


@pytest.fixture(scope="module")
def trained(qa, snps3_base, tmp_path_factory):
    """recipes/vqa_snps3.yaml fine-tuned for 6 steps from the tiny SNP-S3 run: (run folder, final metrics)."""
    from polymodal.train.run import load_recipe, run_recipe
    out = tmp_path_factory.mktemp("snps3_vqa") / "run"
    final = run_recipe(load_recipe(REPO / "recipes/vqa_snps3.yaml", _vqa_overrides(qa[1], out, snps3_base, 6)))
    return out, final


def test_snps3_vqa_trains_and_the_saved_model_reproduces_its_numbers(trained, qa, tmp_path):
    out, final = trained
    saved = polymodal.load_model(out / "model").eval()
    assert type(saved).__name__ == "VQAModel" and type(saved.base).__name__ == "SNPS3Model"
    assert saved.config.num_frames == 4 and saved.config.motion and saved.config.base["model_type"] == "snps3"
    assert saved.frame_embed is None and saved.motion_embed is None     # the cross pass orders the visual tokens
    assert final["eval/vqa/num_questions"] > 0 and "eval/vqa/majority_vqa_accuracy" in final
    assert_eval_reproduces(final, out / "model", "vqa", qa[1] / "test.jsonl", tmp_path / "m.json")


def test_snps3_vqa_reads_the_cross_pass_in_frame_order(trained):
    """The pooled output is the base's cross pooler over [CLS question SEP ; 4 clips + 3 differences ; SEP]; the
    head's input changes when the frames are reversed (positions order the clips), and the loss trained it."""
    out, _ = trained
    saved = polymodal.load_model(out / "model").eval()
    base = saved.base
    torch.manual_seed(0)
    frames = torch.randn(2, 4, 3, 32, 32)
    ids = saved.tokenizer(["what happens first?", "does anything move?"])
    with torch.no_grad():
        ctx = saved.context(frames)
        assert ctx.shape == (2, 4 + 3, base.config.vision.width)
        means = base.video_pass(frames).means                                           # (2, 4, Wv)
        assert torch.allclose(ctx[:, :4], means, atol=1e-6)
        _, pooled = base.cross_pass(ids, ctx, torch.ones(2, 7, dtype=torch.bool))
        assert torch.allclose(saved.fused(frames, ids), pooled, atol=1e-6)
        assert not torch.allclose(saved.answer_logits(frames, ids), saved.answer_logits(frames.flip(1), ids))
        with pytest.raises(ValueError, match="a video model .* got images"):
            saved.answer_logits(frames[:, 0], ids)
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert any("loss" in r for r in log)


def test_snps3_vqa_bad_bases_and_settings_are_one_line_errors(qa, snps3_base, tmp_path):
    from polymodal.models.vqa import VQAModel
    from polymodal.train.run import load_recipe, run_recipe
    base = polymodal.load_model(snps3_base)
    cases = [
        (lambda: VQAModel(polymodal.create_model("tiny"), ["yes"], num_frames=4),
         "neither a multimodal decoder nor a cross encoder"),
        (lambda: VQAModel(base, ["yes"]), r"reads videos .* set vqa.media: video"),
        (lambda: VQAModel(base, ["yes"], num_frames=40), r"data.num_frames=40 gives 41 visual tokens .* "
                                                        r"text.max_visual_tokens=33; lower data.num_frames"),
        (lambda: VQAModel(base, ["yes"], num_frames=20, motion=True), r"with vqa.motion .* or set vqa.motion: false"),
        (lambda: run_recipe(load_recipe(REPO / "recipes/vqa_snps3.yaml",
                                        _vqa_overrides(qa[1], tmp_path / "img", snps3_base, 1) + ["vqa.media=image",
                                                                                                "vqa.motion=false"])),
         r"reads videos .* set vqa.media: video"),
    ]
    for make, pattern in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            make()
        assert "\n" not in str(err.value)
        assert __import__("re").search(pattern, str(err.value)), str(err.value)


def test_coca_vqa_fused_output_is_the_decoder_state_at_the_question_eot():
    """The CoCa side of the base protocol: frame contexts + frame embeddings, decoder at the EOT (unchanged)."""
    from polymodal.models.vqa import VQAModel
    from polymodal.data.text import train_tokenizer
    torch.manual_seed(0)
    coca = polymodal.create_model("coca-tiny", tokenizer=train_tokenizer(["what moves left"] * 4, kind="bpe",
                                                                         vocab_size=64))
    m = VQAModel(coca, ["a", "b"], num_frames=3, motion=True).eval()
    frames, ids = torch.randn(2, 3, 3, 32, 32), m.tokenizer(["what moves", "left"])
    with torch.no_grad():
        ctx = coca.image_context(coca.visual(frames.flatten(0, 1)).tokens).view(2, 3, -1, coca.config.text.width)
        ctx = (ctx + m.frame_embed[:, None]).flatten(1, 2)
        diff = (frames[:, 1:] - frames[:, :-1]).flatten(0, 1)
        dctx = coca.image_context(coca.visual(diff).tokens).view(2, 2, -1, coca.config.text.width)
        context = torch.cat([ctx, (dctx + m.motion_embed[:, None]).flatten(1, 2)], 1)
        x = coca.decoder_norm(coca.decoder(coca.text(ids).tokens, is_causal=True, context=context))
        want = x[torch.arange(2), coca.text._pool_index(ids)]
        assert torch.allclose(m.fused(frames, ids), want, atol=1e-6)


@pytest.mark.slow
def test_snps3_vqa_benchmark_smoke(tmp_path):
    """benchmarks/snps3_vqa.py --quick end to end (2 seeds): results with the table, the paired difference and the
    verdict; a rerun reuses every finished run."""
    from benchmarks.snps3_vqa import parse_args, run
    argv = ["--quick", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--seeds", "0", "1",
            "--quiet"]
    result = run(parse_args(argv))
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| SNP-S3 with MSSM -> VQA |" in md and "Paired difference MSSM - MLM" in md and "Verdict" in md
    assert set(result["variants"]) == {"mssm", "mlm"} and result["paired"]["mssm-mlm"]["vqa_accuracy"]["n"] == 2
    for v in result["variants"].values():
        assert len(v["values"]["vqa_accuracy"]) == 2 and 0 <= v["mean"]["majority_vqa_accuracy"] <= 100
    stamp = (tmp_path / "runs" / "vqa_mssm_s0" / "model" / "model.safetensors").stat().st_mtime
    again = run(parse_args(argv))
    assert (tmp_path / "runs" / "vqa_mssm_s0" / "model" / "model.safetensors").stat().st_mtime == stamp
    for k, v in result["variants"]["mssm"]["values"].items():         # the cached numbers (JSON keeps 12 digits)
        assert again["variants"]["mssm"]["values"][k] == pytest.approx(v, rel=1e-9), k
