"""The family contract, for every `model_type` of `polymodal.models.families.FAMILIES`: a tiny model of the family,
saved with `save_pretrained` and read back with `polymodal.load_model`, is the same class with the same outputs and
processors, and the eval tasks it supports give the same numbers on the loaded copy as on the model in memory."""
import json

import pytest
import torch
import torch.nn.functional as F

from polymodal.data.text import train_tokenizer
from polymodal.eval.tasks import check_model, run_task
from polymodal.hub import load_model
from polymodal.models.families import FAMILIES

TEXTS = ["a red circle moves left", "a big blue square grows", "a small green star turns red",
         "a yellow triangle moves up then down", "the circle appears", "a purple heart shrinks"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, moving_world):
    """Small worlds for the tasks the families support."""
    from polymodal.data.synthetic.counterfactual import generate_counterfactual
    from polymodal.data.synthetic.preferences import generate_preferences
    from polymodal.data.synthetic.shapes import generate_shapes
    shapes = tmp_path_factory.mktemp("contract_shapes")
    generate_shapes(shapes, n_train=16, n_test=12, n_val=0, n_hard=0, seed=1, progress=False)
    prefs = tmp_path_factory.mktemp("contract_prefs")
    generate_preferences(prefs, n_train=8, n_base=8, n_val=8, n_test=16, seed=0)
    cf = tmp_path_factory.mktemp("contract_cf")
    generate_counterfactual(cf, n_train_sets=2, n_eval_sets=2, seed=0)
    moving = moving_world(n_train=8, n_test=6, seed=21, num_frames=4)
    rows = [json.loads(x) for x in (moving / "test.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["aux_captions"] = [rows[(i + 1) % len(rows)]["caption"]]
    (moving / "test_aux.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from polymodal.data.synthetic.shapes_qa import generate_shapes_qa
    qa = tmp_path_factory.mktemp("contract_qa")
    generate_shapes_qa(qa, n_train=0, n_test=8, n_val=0, seed=1, progress=False, workers=1)
    return {"shapes": shapes, "prefs": prefs, "cf": cf, "moving": moving, "qa": qa}


def _tokenizers():
    corpus = TEXTS * 4
    return (train_tokenizer(corpus, kind="bpe", vocab_size=120),
            train_tokenizer(corpus, kind="wordpiece", vocab_size=120))


def _video(tok, kind="mean"):
    from polymodal.models.factory import create_model
    from polymodal.models.video import VideoCLIP
    temporal = {"kind": kind, "stan_layers": 1} if kind == "stan" else {"kind": kind, "layers": 1}
    return VideoCLIP.from_image_model(create_model("tiny", tokenizer=tok), temporal)


def _perturb(model):
    """Move every zero-initialised weight (gates, zero projections) so that no part is silently at its init."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def build(model_type: str):
    """A tiny model of the family (random weights) and the eval tasks to compare, as (task, data key, options)."""
    from polymodal.models.factory import create_model
    bpe, wp = _tokenizers()
    torch.manual_seed(0)
    image_tasks = [("retrieval", "shapes/test.jsonl", {}), ("zeroshot", "shapes/test.jsonl",
                                                          {"classes": "shapes/classes.json"})]
    video_opts = {"num_frames": 4}
    if model_type == "clip":
        return create_model("tiny", tokenizer=bpe), image_tasks
    if model_type == "m2":
        return create_model("m2-tiny", tokenizer=wp), image_tasks[:1]
    if model_type == "coca":
        return create_model("coca-tiny", tokenizer=bpe), image_tasks[:1]
    if model_type == "video_clip":
        return _video(bpe, "transformer"), [("video_retrieval", "moving/test.jsonl", video_opts)]
    if model_type == "m2raap":
        from polymodal.models.video_heads import M2RAAPModel
        model = M2RAAPModel.from_video_model(_video(bpe, "stan"), similarity="mug", acg=True, mug_block=4)
        return model, [("video_retrieval", "moving/test_aux.jsonl", video_opts)]
    if model_type == "shenet":
        from polymodal.models.hierarchy import SHENetModel
        model = SHENetModel.from_video_model(_video(bpe), verb_weight=0.5, adj_weight=0.3, tau=0.2)
        return model, [("shenet_retrieval", "moving/test.jsonl", video_opts)]
    if model_type == "scene":
        return None, [("scene", "moving/test.jsonl", video_opts)]      # built in the test (needs the world's labels)
    if model_type == "snps3":
        from polymodal.data.masking import count_significant_words
        from polymodal.models.fusion import FusionConfig, create_snps3_model
        cfg = FusionConfig(vision={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
                           text={"width": 32, "layers": 1, "heads": 2, "context_length": 16})
        model = create_snps3_model(cfg, wp)
        words = count_significant_words(TEXTS, wp.backend.get_vocab(), top_k=20, tagger=_tagger)
        model.config.significant_words = words.to_dict()
        return model, [("snps3_retrieval", "moving/test.jsonl", {**video_opts, "rerank_top_k": 2})]
    if model_type == "text_reward":
        from polymodal.models.reward import TextRewardModel
        model = TextRewardModel.from_tokenizer(bpe, {"width": 32, "layers": 1, "heads": 2, "context_length": 32})
        return model, [("preference", "prefs/test.jsonl", {})]
    if model_type == "mllm":
        from polymodal.models.mllm import create_mllm, mllm_config
        cf_tok = train_tokenizer(TEXTS * 4 + ["what is the role of the figure ? doctor nurse teacher"], kind="bpe",
                                 vocab_size=160)
        return create_mllm(mllm_config("mllm-tiny", {"lm.width": 32, "lm.heads": 2}, cf_tok), cf_tok), \
            [("fairness", "cf/eval.jsonl", {})]
    if model_type == "multilabel_adapter":
        from polymodal.models.multilabel import AdaptedEncoder, AdapterConfig, MultiLabelAdapter
        clip = create_model("tiny", tokenizer=bpe)
        names = json.loads(_SHAPE_CLASSES)
        adapter = MultiLabelAdapter(AdapterConfig(embed_dim=clip.config.embed_dim),
                                    F.normalize(torch.randn(len(names), clip.config.embed_dim), dim=-1), names)
        return AdaptedEncoder(clip, adapter), image_tasks[:1]
    if model_type == "classifier":
        from polymodal.data.synthetic.shapes import class_names
        from polymodal.models.classifier import ImageClassifier
        return ImageClassifier(create_model("tiny", tokenizer=bpe), class_names("en")), \
            image_tasks[:1] + [("classification", "shapes/test.jsonl", {})]
    if model_type == "vqa":
        from polymodal.data.synthetic.shapes_qa import QUESTION_TYPES, answer_space
        from polymodal.models.vqa import VQAModel
        answers = sorted({a for t in QUESTION_TYPES for a in answer_space(t)})
        return VQAModel(create_model("coca-tiny", tokenizer=bpe), answers, list(range(1, len(answers) + 1)),
                        {"exists": "no"}), image_tasks[:1] + [("vqa", "qa/test.jsonl", {})]
    raise AssertionError(f"no tiny builder for model_type {model_type!r}: add one to this test")


_SHAPE_CLASSES = '["circle", "square", "triangle", "star", "heart"]'


def _tagger(texts):
    """Every word a noun (the significant-word counter's tagger, without spaCy)."""
    return [[(w, "NOUN", w) for w in t.split()] for t in texts]


def _outputs(model, data) -> dict:
    """The family's own forward results on fixed inputs."""
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32)
    frames, valid = torch.randn(2, 4, 3, 32, 32), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = {}
    with torch.no_grad():
        if hasattr(model, "video_features"):
            recs = [{"aux_captions": [TEXTS[0]]}, {"aux_captions": []}]
            v, t = model.video_features(frames, valid, recs), model.text_features(TEXTS[:3])
            out["similarity"] = model.similarity(t, v)
        elif hasattr(model, "label_embeddings"):
            out["logits"] = model(frames, valid).logits
        elif hasattr(model, "score_pairs"):
            out["score"] = model.score(TEXTS)
        elif hasattr(model, "option_logprobs"):
            out["options"] = model.option_logprobs(pixels, TEXTS[:2], [["doctor", "nurse"]] * 2)
        elif hasattr(model, "adapter"):
            out["logits"] = model(pixels)
        elif hasattr(model, "answer_logits"):
            out["answers"] = model.answer_logits(pixels, model.tokenizer(TEXTS[:2]))
        elif hasattr(model, "classify"):
            out["logits"] = model.classify(pixels)
        if hasattr(model, "encode_image") and not hasattr(model, "video_features"):
            out["image"] = model.encode_image(pixels)
        if hasattr(model, "encode_text") and hasattr(model, "config") and hasattr(model.config, "text"):
            ids = model.tokenizer(TEXTS[:3])
            out["text"] = model.encode_text(ids)
    return out


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_saves_loads_and_evaluates_the_same(model_type, data, tmp_path):
    model, tasks = build(model_type)
    if model_type == "scene":
        from polymodal.data.labels import load_hierarchy
        from polymodal.models.scene import SceneConfig, SceneModel
        bpe, _ = _tokenizers()
        model = SceneModel(_video(bpe), load_hierarchy(data["moving"] / "classes.json"),
                           SceneConfig(layers=1, fusion_layers=1))
    model = _perturb(model).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config.model_type == model_type
    assert json.loads(json.dumps(loaded.config.to_dict())) == json.loads(json.dumps(model.config.to_dict()))
    assert not loaded.training
    # Processors: the same tokenizer ids and image transform.
    assert loaded.tokenizer is not None
    if hasattr(model.tokenizer, "backend"):
        assert torch.equal(loaded.tokenizer(TEXTS), model.tokenizer(TEXTS))
    if getattr(model, "image_transform", None) is not None:
        assert loaded.image_transform.to_dict() == model.image_transform.to_dict()
    # Outputs.
    want, got = _outputs(model, data), _outputs(loaded, data)
    assert want and set(want) == set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=f"{model_type}: {k}")
    # The eval tasks it supports, on the loaded copy and on the model in memory.
    for task, path, options in tasks:
        options = {k: str(data[v.split("/")[0]] / v.split("/", 1)[1]) if k == "classes" else v
                   for k, v in options.items()}
        manifest = data[path.split("/")[0]] / path.split("/", 1)[1]
        check_model(task, loaded)
        a = run_task(task, model, str(manifest), **options)
        b = run_task(task, loaded, str(manifest), **options)
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], abs=1e-4, nan_ok=True), (model_type, task, k)


def test_every_family_has_a_config_class_and_builds_from_it():
    from polymodal.models.families import family_class
    for model_type in FAMILIES:
        cls = family_class(model_type)
        assert getattr(cls, "config_class", None) is not None, model_type
        assert cls.config_class().model_type == model_type


def test_unknown_model_type_names_the_file_and_the_known_types(tmp_path):
    from polymodal.config import ConfigError
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"polymodal_version": "0.1.0", "model_type": "nope"}))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"config.json: unknown model_type 'nope'; known: .*scene.*multilabel_adapter"):
        load_model(tmp_path / "m")


def test_folders_written_before_the_families_still_load(data, tmp_path):
    """Scene and M2-RAAP folders of the previous layout (a plain video model plus side files) load as their family
    with the same outputs."""
    from safetensors.torch import save_file

    from polymodal.data.labels import load_hierarchy
    from polymodal.models.scene import SceneConfig, SceneModel
    from polymodal.models.video_heads import M2RAAPModel
    bpe, _ = _tokenizers()
    scene = _perturb(SceneModel(_video(bpe), load_hierarchy(data["moving"] / "classes.json"),
                                SceneConfig(layers=1, fusion_layers=1))).eval()
    old = tmp_path / "scene"
    scene.video.save_pretrained(old)                                     # what the old save wrote, file by file
    save_file({k: v.contiguous() for k, v in scene.state_dict().items() if not k.startswith("video.")},
              str(old / "scene_heads.safetensors"))
    settings = {k: v for k, v in scene.config.to_dict().items() if k not in ("video", "labels", "model_type")}
    (old / "scene_config.json").write_text(json.dumps({"scene": settings, "labels": scene.hierarchy.to_dict()}))
    loaded = load_model(old)
    assert isinstance(loaded, SceneModel)
    torch.testing.assert_close(_outputs(loaded, data)["logits"], _outputs(scene, data)["logits"])

    m2 = _perturb(M2RAAPModel.from_video_model(_video(bpe), similarity="mug", acg=True)).eval()
    old = tmp_path / "m2raap"
    m2.save_pretrained(old)
    cfg = json.loads((old / "config.json").read_text())
    section = {k: cfg.pop(k) for k in ("similarity", "mug_tau", "mug_block", "acg", "acg_level", "aux_field", "max_aux")}
    cfg["model_type"] = "video_clip"
    (old / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file
    state = load_file(str(old / "model.safetensors"))
    save_file({k[len("acg."):]: v for k, v in state.items() if k.startswith("acg.")}, str(old / "m2raap_heads.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("acg.")}, str(old / "model.safetensors"))
    (old / "m2raap.json").write_text(json.dumps({**section, "temporal": {}, "mug_temperature": 0.01}))
    loaded = load_model(old)
    assert isinstance(loaded, M2RAAPModel) and loaded.config.similarity == "mug"
    torch.testing.assert_close(_outputs(loaded, data)["similarity"], _outputs(m2, data)["similarity"])
