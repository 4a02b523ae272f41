"""Every user error on the command line is one line, `polymodal: error: ...`, exit status 2, no traceback;
and a run checks its values and paths before the first step (issue: reliability)."""
import json

import pytest
import torch

from polymodal import cli


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from polymodal.data.synthetic.shapes import generate_shapes
    out = tmp_path_factory.mktemp("shapes_cli")
    generate_shapes(out, n_train=40, n_test=20, n_val=10, n_hard=8, seed=2, progress=False)
    return out


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory, shapes):
    from polymodal.data.text import train_tokenizer
    from polymodal.models.factory import create_model
    tok = train_tokenizer(["a red star", "a blue circle"] * 20, kind="bpe", vocab_size=64)
    path = tmp_path_factory.mktemp("m") / "clip"
    create_model("tiny", tokenizer=tok).save_pretrained(path)
    return path


def _run(args, capsys):
    code = cli.main(list(args))
    err = capsys.readouterr().err
    return code, err


def _one_line_error(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip() and "warning" not in line.lower()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert lines[-1].startswith("polymodal: error: "), err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


@pytest.mark.parametrize("override, needle", [
    ("optim.schedule=cosin", "optim.schedule"),
    ("loss.gather=globall", "loss.gather"),
    ("train.steps=0", "train.steps"),
    ("train.steps=-5", "train.steps"),
    ("train.ckpt_every=-1", "train.ckpt_every"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.accum_steps=0", "optim.accum_steps"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("data.batch_size=0", "data.batch_size"),
    ("eval.limit=-5", "eval.limit"),
    ("eval={tasks: [{task: retrievall, data: x.jsonl}]}", "retrievall"),
])
def test_bad_recipe_values_fail_at_load_in_one_line(tmp_path, capsys, override, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: clip\nmodel: {name: tiny}\n")
    code, err = _run(["train", str(recipe), override, f"out_dir={tmp_path}/run"], capsys)
    _one_line_error(code, err, f"override {override!r}", needle)     # blamed on the override, not the file
    assert not (tmp_path / "run").exists()          # nothing was built or written


def test_a_wrong_eval_path_fails_before_training(tmp_path, shapes, capsys):
    code, err = _run(["train", str(_recipe(tmp_path)), f"data.train={shapes}/train.jsonl",
                      f"eval.retrieval={tmp_path}/missing.jsonl", f"out_dir={tmp_path}/run"], capsys)
    _one_line_error(code, err, "eval", "missing.jsonl")
    assert not (tmp_path / "run" / "checkpoints").exists()


def _recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: clip\nmodel: {name: tiny}\ntrain: {steps: 2, progress: false}\n")
    return recipe


def test_eval_errors_are_one_line(tmp_path, shapes, saved_clip, capsys):
    _one_line_error(*_run(["eval", str(saved_clip), "--task", "captioning", "--data", f"{shapes}/test.jsonl"],
                          capsys), "needs a model with generate")
    _one_line_error(*_run(["eval", str(saved_clip), "--task", "retrieval", "--data", f"{tmp_path}/nope.jsonl"],
                          capsys), "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_line_error(*_run(["eval", str(saved_clip), "--task", "retrieval", "--data", str(empty)], capsys),
                    "empty.jsonl")
    with pytest.raises(SystemExit) as e:                         # argparse's own usage error, exit 2
        cli.main(["eval", str(saved_clip), "--task", "retrieval", "--data", f"{shapes}/test.jsonl", "--limit", "-5"])
    assert e.value.code == 2 and "must be >= 0" in capsys.readouterr().err


def test_broken_model_folders_name_the_file(tmp_path, shapes, saved_clip, capsys):
    import shutil
    bad_json = tmp_path / "bad_json"
    shutil.copytree(saved_clip, bad_json)
    (bad_json / "config.json").write_text('{"polymodal_version": "0.1.0", "vision": ')
    _one_line_error(*_run(["eval", str(bad_json), "--task", "retrieval", "--data", f"{shapes}/test.jsonl"],
                          capsys), "config.json", "not valid JSON")
    bad_pre = tmp_path / "bad_preprocessor"
    shutil.copytree(saved_clip, bad_pre)
    (bad_pre / "preprocessor_config.json").write_text('{"image_size": ')
    _one_line_error(*_run(["eval", str(bad_pre), "--task", "retrieval", "--data", f"{shapes}/test.jsonl"],
                          capsys), "preprocessor_config.json", "not valid JSON")
    (bad_pre / "preprocessor_config.json").write_text('{"image_size": "huge", "resize": "sideways"}')
    _one_line_error(*_run(["eval", str(bad_pre), "--task", "retrieval", "--data", f"{shapes}/test.jsonl"],
                          capsys), "preprocessor_config.json")
    truncated = tmp_path / "truncated"
    shutil.copytree(saved_clip, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    _one_line_error(*_run(["eval", str(truncated), "--task", "retrieval", "--data", f"{shapes}/test.jsonl"],
                          capsys), "model.safetensors")


def test_pickle_in_an_hf_folder_is_refused_without_suggesting_unsafe_loading(tmp_path, shapes, capsys):
    from transformers import CLIPConfig as HFConfig
    folder = tmp_path / "hf"
    folder.mkdir()
    cfg = HFConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "vocab_size": 99},
                   vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "image_size": 32, "patch_size": 8}, projection_dim=16)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    code, err = _run(["eval", str(folder), "--task", "retrieval", "--data", f"{shapes}/test.jsonl"], capsys)
    _one_line_error(code, err, "pytorch_model.bin")
    assert "weights_only=False" not in err and "pwned" not in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: clip\n")
    with pytest.raises(Exception, match="train.steps"):
        cli.main(["--debug", "train", str(recipe), "train.steps=0"])
