"""The LLaVA-style MLLM: option probabilities, padding invariance, HF causal LMs, generation, save/load."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from polymodal.data.text import train_tokenizer  # noqa: E402
from polymodal.hub import load_model  # noqa: E402
from polymodal.models.mllm import MLLM, create_mllm, mllm_config  # noqa: E402

WORDS = "which role fits the figure leader helper artist how many other objects are there one two three yes no"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([WORDS] * 4, vocab_size=300, min_frequency=1)


def tiny(tok, **over):
    torch.manual_seed(0)
    return create_mllm(mllm_config("mllm-tiny", {"lm.width": 32, "lm.heads": 2, **over}, tok), tok).eval()


def gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id))


def manual_logprob(model, pixels, prompt, answer):
    """Sum log p(answer tokens + EOS) from one unpadded sequence, built by hand."""
    tok, c = model.tokenizer, model.config
    img = model.image_embeds(pixels[None])                                  # (1, N, D)
    p = torch.tensor([tok.encode(prompt)])
    a = torch.tensor([[c.bos_token_id, *tok.encode(answer), c.eos_token_id]])
    x = torch.cat([img, model.lm.embed_tokens(torch.cat([p, a], 1))], 1)
    L = x.shape[1]
    logits = model.lm(x, torch.ones(1, L, dtype=torch.bool), torch.arange(L)[None])
    logp = logits.log_softmax(-1)[0]
    start = img.shape[1] + p.shape[1]                                       # position of SEP
    return sum(float(logp[start + j, a[0, j + 1]]) for j in range(a.shape[1] - 1))


@pytest.mark.parametrize("kind", ["ours", "gpt2"])
def test_answer_probabilities_sum_to_one_and_match_a_hand_built_sequence(tok, kind):
    model = tiny(tok) if kind == "ours" else create_mllm(mllm_config("mllm-tiny", {}, tok), tok, lm=gpt2(tok)).eval()
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    prompts = ["which role fits the figure?", "how many?", "how many other objects are there?"]
    options = ["leader", "helper artist", "one"]
    probs = model.answer_probabilities(pixels, prompts, options)
    assert probs.shape == (3, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    with torch.no_grad():
        want = torch.tensor([[manual_logprob(model, pixels[i], prompts[i], o) for o in options] for i in range(3)])
    # Rows of different prompt lengths are left-padded in one batch: no leak from the padding.
    torch.testing.assert_close(probs, want.softmax(-1), atol=1e-5, rtol=1e-4)


def test_a_tiny_llama_from_a_config_dict_plugs_in_and_learns(tok):
    cfg = mllm_config("mllm-tiny", {"hf_lm": {"model_type": "llama", "vocab_size": tok.vocab_size, "hidden_size": 32,
                                              "intermediate_size": 64, "num_hidden_layers": 2,
                                              "num_attention_heads": 2, "num_key_value_heads": 2,
                                              "max_position_embeddings": 64}}, tok)
    torch.manual_seed(0)
    model = create_mllm(cfg, tok)
    assert type(model.lm.model).__name__ == "LlamaForCausalLM"
    pixels = torch.randn(4, 3, 32, 32)
    pid, pm = model.encode_prompts(["which role fits the figure?"] * 4)
    aid, am = model.encode_answers(["leader", "helper", "artist", "leader"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss = model(pixels, pid, pm, aid, am).nll.mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first * 0.7


def test_generation_reuses_the_coca_search(tok):
    model = tiny(tok)
    pixels = torch.randn(2, 3, 32, 32)
    prompts = ["which role fits the figure?", "how many other objects are there?"]
    greedy = model.generate(pixels, prompts, method="greedy", max_len=5)
    assert (greedy[:, 0] == model.config.bos_token_id).all()
    # The first generated token is the argmax of the next-token logits after SEP.
    img = model.image_embeds(pixels)
    pid, pm = model.encode_prompts(prompts)
    sep = torch.full((2, 1), model.config.bos_token_id)
    first = model.continuation_logits(img, pid, pm, sep, torch.ones_like(sep, dtype=torch.bool))[:, -1].argmax(-1)
    assert torch.equal(greedy[:, 1], first)
    beam1 = model.generate(pixels, prompts, method="beam", num_beams=1, max_len=5)
    assert torch.equal(beam1, greedy[:, :beam1.shape[1]])
    assert len(model.generate_text(pixels, prompts)) == 2
    with pytest.raises(ValueError, match="greedy or beam"):
        model.generate(pixels, prompts, method="nope")


@pytest.mark.parametrize("kind", ["ours", "gpt2"])
def test_save_and_load_round_trip(tok, tmp_path, kind):
    model = tiny(tok, projector="linear") if kind == "ours" else create_mllm(mllm_config("mllm-tiny", {}, tok), tok,
                                                                              lm=gpt2(tok)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    before = model.answer_probabilities(pixels, ["which role fits the figure?"] * 2, ["leader", "helper", "artist"])
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, MLLM) and loaded.tokenizer is not None
    after = loaded.answer_probabilities(pixels, ["which role fits the figure?"] * 2, ["leader", "helper", "artist"])
    torch.testing.assert_close(after, before)


def test_bad_configs_say_what_to_fix(tok, tmp_path):
    with pytest.raises(ValueError, match="projector"):
        mllm_config("mllm-tiny", {"projector": "conv"}, tok)
    with pytest.raises(ValueError, match="unknown MLLM preset"):
        mllm_config("nope")
    with pytest.raises(FileNotFoundError, match="not a transformers model directory"):
        MLLM(mllm_config("mllm-tiny", {"lm_path": str(tmp_path)}, tok))
