"""Reward models: the Bradley-Terry loss and accuracy by hand, our text-tower reward model, and tiny random HF
GPT-2 / Llama reward models that train, save and reload in transformers with identical rewards."""
import math
import os

import pytest
import torch

from polymodal.data.text import train_tokenizer
from polymodal.eval.preference import pairwise_accuracy
from polymodal.losses.preference import bradley_terry_loss
from polymodal.hub import load_model
from polymodal.models.reward import HFRewardModel, TextRewardModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

GOOD = ["yes i can help with that", "sure here is the answer", "happy to help you today"]
BAD = ["no go away", "i will not answer", "figure it out yourself"]


def _toy_pairs(n=48):
    return [(f"question {i % 5}", GOOD[i % 3], BAD[(i + 1) % 3]) for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"question {i}\n{t}" for i in range(5) for t in GOOD + BAD]
    return train_tokenizer(texts, vocab_size=200, context_length=32, min_frequency=1)


def _log_sigmoid(x):
    return -math.log(1 + math.exp(-x))


def test_bradley_terry_loss_by_hand():
    rw, rl = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.0, 1.0, -1.0])
    plain = -(_log_sigmoid(1.0) + _log_sigmoid(-0.5) + _log_sigmoid(3.0)) / 3
    assert float(bradley_terry_loss(rw, rl)) == pytest.approx(plain, rel=1e-6)
    margin = torch.tensor([0.5, 0.0, 1.0])
    with_margin = -(_log_sigmoid(0.5) + _log_sigmoid(-0.5) + _log_sigmoid(2.0)) / 3
    assert float(bradley_terry_loss(rw, rl, margin)) == pytest.approx(with_margin, rel=1e-6)
    centred = with_margin + 0.1 * (1.0 ** 2 + 1.5 ** 2 + 1.0 ** 2) / 3
    assert float(bradley_terry_loss(rw, rl, margin, center_coefficient=0.1)) == pytest.approx(centred, rel=1e-6)


def test_pairwise_accuracy_counts_ties_as_wrong():
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])) == 0.5


def test_text_reward_model_keeps_the_end_of_long_texts_and_round_trips(tokenizer, tmp_path):
    torch.manual_seed(0)
    m = TextRewardModel.from_tokenizer(tokenizer, {"width": 32, "layers": 2, "heads": 2, "context_length": 8})
    long = "question 1 " + " ".join(GOOD * 3)
    ids, mask = m.encode([long, "yes"])
    assert ids.shape == (2, 8) and mask[0].all() and mask[1].sum() == len(tokenizer.encode("yes")) + 2
    content = tokenizer.encode(long)
    assert ids[0].tolist() == [tokenizer.bos_id, *content[-6:], tokenizer.eos_id]   # cut from the left
    m.save_pretrained(tmp_path / "rm")
    back = load_model(tmp_path / "rm")
    texts = [m.format(p, c) for p, c, _ in _toy_pairs(6)]
    assert torch.equal(back.score(texts), m.eval().score(texts))


def _train(model, pairs, steps=25, lr=3e-3):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        batch = pairs[(step * 8) % len(pairs):][:8]
        ids_c, mask_c = model.encode([model.format(p, c) for p, c, _ in batch])
        ids_r, mask_r = model.encode([model.format(p, r) for p, _, r in batch])
        loss = bradley_terry_loss(model(ids_c, mask_c), model(ids_r, mask_r))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def _hf_dir(tmp_path, tokenizer, kind):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    d = tmp_path / kind
    tokenizer.save(d)                    # tokenizer.json + tokenizer_config.json: AutoTokenizer reads them
    if kind == "gpt2":                   # GPT-2 has no pad token of its own; ours is <|pad|>
        cfg = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
        GPT2LMHeadModel(cfg).save_pretrained(d)
    else:
        cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                          pad_token_id=tokenizer.pad_id)
        LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_reward_model_trains_saves_and_reloads_in_transformers(tokenizer, tmp_path, kind):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    torch.manual_seed(0)
    model = HFRewardModel.from_pretrained(_hf_dir(tmp_path, tokenizer, kind), max_length=64)   # a causal LM + new head
    assert isinstance(model, HFRewardModel) and model.hf.config.num_labels == 1
    assert model.hf.config.pad_token_id == tokenizer.pad_id
    pairs = _toy_pairs()
    before = pairwise_accuracy(*model.score_pairs([_P(*p) for p in pairs]))
    _train(model, pairs)
    r_c, r_r = model.score_pairs([_P(*p) for p in pairs])
    assert pairwise_accuracy(r_c, r_r) == 1.0 and before < 1.0
    model.save_pretrained(tmp_path / f"{kind}_rm")

    # transformers alone, as TRL would load it
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / f"{kind}_rm").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / f"{kind}_rm")
    texts = [model.format(p, c) for p, c, _ in pairs[:6]] + [model.format(p, r) for p, _, r in pairs[:6]]
    assert tok.truncation_side == "left"       # saved with the tokenizer: long prompts lose their start
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**enc).logits[:, 0]
    ours = model.score(texts)
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs, ours)
    assert torch.allclose(load_model(tmp_path / f"{kind}_rm").score(texts), ours, atol=1e-6)   # detected as a reward model


class _P:
    def __init__(self, prompt, chosen, rejected):
        self.prompt, self.chosen, self.rejected = prompt, chosen, rejected


def test_missing_reward_model_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_model(tmp_path / "nothing")


CHAT = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")


def test_a_folder_trained_elsewhere_scores_as_trl_rendered_it(tokenizer, tmp_path):
    """No polymodal_reward.json: prompt + response + EOS through the tokenizer, the chat template for messages."""
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    model = HFRewardModel.from_pretrained(_hf_dir(tmp_path, tokenizer, "gpt2"), max_length=64)
    tok = AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    assert model.template == "trl"
    text = model.format("question 1 ", "sure here is the answer")
    assert text == "question 1 sure here is the answer" + tok.eos_token
    assert model.format("q ", "a" + tok.eos_token).count(tok.eos_token) == 1          # not added twice
    ids, mask = model.encode([text])
    assert ids[0][mask[0]].tolist() == tok(text)["input_ids"]                       # TRL's tokenize: tok(text)
    with torch.no_grad():
        theirs = model.hf(input_ids=torch.tensor([tok(text)["input_ids"]])).logits[0, 0]
    assert torch.allclose(model.eval().score([text])[0], theirs, atol=1e-5)

    with pytest.raises(ValueError, match="no chat template.*reward.template=plain"):
        model.format([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yes"}])
    model.tokenizer.chat_template = CHAT
    msgs = [{"role": "user", "content": "question 1"}, {"role": "assistant", "content": "yes i can help"}]
    text = model.format(msgs[:1], msgs[1:])
    ids, mask = model.encode([text])
    assert ids[0][mask[0]].tolist() == model.tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)[
        "input_ids"]                                                                    # one BOS, as TRL's rows


def test_saved_template_and_plain_rendering_are_kept(tokenizer, tmp_path):
    model = HFRewardModel.from_pretrained(_hf_dir(tmp_path, tokenizer, "gpt2"), max_length=64, template="auto")
    model.save_pretrained(tmp_path / "rm")
    back = load_model(tmp_path / "rm")
    assert back.template == "auto" and back.format("q", "a") == "q\na"          # trained so, scored so


def test_preference_eval_counts_and_can_drop_overlong_pairs(tokenizer, tmp_path):
    from polymodal.data.preference import write_preferences
    from polymodal.eval.preference import preference_eval_task
    model = HFRewardModel.from_pretrained(_hf_dir(tmp_path, tokenizer, "gpt2"), max_length=24)
    pairs = [_P("question 1 ", "yes", "no"), _P("question 2 ", " ".join(GOOD * 3), "no")]
    assert model.token_lengths([model.format(p.prompt, p.chosen) for p in pairs])[0] <= 24
    for p in pairs:
        p.margin, p.dimension, p.subset = None, "", ""
    write_preferences(pairs, tmp_path / "p.jsonl")
    cut = preference_eval_task(model, tmp_path / "p.jsonl")
    drop = preference_eval_task(model, tmp_path / "p.jsonl", overlong="drop")
    assert cut["num_overlong"] == 1 and drop["num_dropped"] == 1 and "num_dropped" not in cut
    assert cut["pairs"] == 2 and drop["pairs"] == 1
    with pytest.raises(ValueError, match="overlong must be 'cut' or 'drop'"):
        preference_eval_task(model, tmp_path / "p.jsonl", overlong="skip")
