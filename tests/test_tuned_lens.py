"""The tuned lens: identity translators are the logit lens, training lowers the KL, files round-trip exactly,
bad files and mismatched models get clear errors, and the CLI trains a lens that the audit reads."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_png_of, make_tiny_model, saved_figures

import dipreg
import dipreg.audit as audit_module
from dipreg.adapter import ModelAdapter
from dipreg.cli import main
from dipreg.lenses.tuned import TunedLens, load_tuned_lens
from dipreg.lenses.tuned_training import (
    GENERIC_PROMPTS,
    IN_DOMAIN_SETS,
    TrainSettings,
    collect_hidden_states,
    in_domain_texts,
    lens_kl,
    sample_out_of_domain_texts,
    train_tuned_lens,
)
from dipreg.stimuli import save_pairs

TEXTS = [
    "Alice chased Bob . Who chased ? Answer : Alice",
    "the cat chased the dog . it was hot",
    "ice is cold . fire is hot . True or False ?",
    "is it good to help ? Yes . is it right to steal ? No",
    "Bob was chased by the cat , the dog was chased by Alice",
    "Question : is it wrong to steal ? Answer : Yes",
]


def trained_lens(model, tokenizer, steps=40):
    adapter = ModelAdapter(model)
    hidden = collect_hidden_states(adapter, tokenizer, TEXTS, positions_per_sequence=6)
    settings = TrainSettings(steps=steps, lr=3e-3, batch_tokens=16, vocab_top_k=0)
    lens, losses = train_tuned_lens(adapter, hidden, settings, meta={"model_id": "tiny"})
    return adapter, hidden, lens, losses


def test_identity_translators_reproduce_the_logit_lens_exactly(tiny_model, tiny_tokenizer, tiny_pairs, tmp_path):
    adapter = ModelAdapter(tiny_model)
    path = TunedLens(adapter.num_layers, adapter.lm_head.weight.shape[-1]).save(tmp_path / "identity.pt")
    tuned = dipreg.trajectories(tiny_model, tiny_tokenizer, tiny_pairs, lens="tuned", path=path)
    logit = dipreg.trajectories(tiny_model, tiny_tokenizer, tiny_pairs, lens="logit")
    assert tuned.lens == "tuned"
    assert torch.equal(tuned.margin_a, logit.margin_a) and torch.equal(tuned.margin_b, logit.margin_b)


def test_training_lowers_the_kl_to_the_final_layer(llama_tiny, tiny_tokenizer):
    adapter, hidden, lens, losses = trained_lens(llama_tiny, tiny_tokenizer)
    assert hidden.shape == (8, 6 * 6, 32)
    identity = TunedLens(8, 32)
    with torch.no_grad():
        before, after = lens_kl(identity, adapter, hidden, None), lens_kl(lens, adapter, hidden, None)
    assert after < 0.5 * before, f"KL on the training positions {before:.4f} -> {after:.4f}"
    assert sum(losses[-5:]) < sum(losses[:5])
    assert all(p.requires_grad for p in llama_tiny.parameters()), "the model's trainability is restored"


def test_trained_lens_keeps_the_last_layer_equal_to_the_output(llama_tiny, tiny_tokenizer, tiny_pairs, tmp_path):
    _, _, lens, _ = trained_lens(llama_tiny, tiny_tokenizer, steps=10)
    tuned = dipreg.trajectories(llama_tiny, tiny_tokenizer, tiny_pairs, lens=lens)
    logit = dipreg.trajectories(llama_tiny, tiny_tokenizer, tiny_pairs, lens="logit")
    assert torch.equal(tuned.margin_a[:, -1], logit.margin_a[:, -1])
    assert not torch.allclose(tuned.did[:, :-1], logit.did[:, :-1], atol=1e-4)


def test_save_load_round_trips_exactly(llama_tiny, tiny_tokenizer, tiny_pairs, tmp_path):
    _, _, lens, _ = trained_lens(llama_tiny, tiny_tokenizer, steps=10)
    path = lens.save(tmp_path / "lens" / "tuned-lens.pt")
    loaded = TunedLens.load(tmp_path / "lens")  # a folder means the tuned-lens.pt inside it
    assert loaded.meta == {**lens.meta, "num_layers": 8, "hidden_size": 32}
    original, restored = lens.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    a = dipreg.trajectories(llama_tiny, tiny_tokenizer, tiny_pairs, lens=lens)
    b = dipreg.trajectories(llama_tiny, tiny_tokenizer, tiny_pairs, lens="tuned", path=path)
    assert torch.equal(a.did, b.did)


def test_missing_tuned_lens_tells_how_to_train_one(llama_tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("DIPREG_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dipreg tuned-lens train --corpus out-of-domain"):
        load_tuned_lens(ModelAdapter(llama_tiny))
    with pytest.raises(FileNotFoundError, match="No tuned lens at"):
        load_tuned_lens(ModelAdapter(llama_tiny), path=tmp_path / "nowhere.pt")


@pytest.mark.parametrize(
    ("layers", "width", "wrong"), [(6, 32, "6 layers of width 32"), (8, 16, "8 layers of width 16")]
)
def test_lens_for_another_shape_is_rejected(llama_tiny, tmp_path, layers, width, wrong):
    path = TunedLens(layers, width, {"model_id": "other"}).save(tmp_path / "other.pt")
    with pytest.raises(ValueError, match=f"trained for {wrong}.*'other'.*got 8 layers of width 32"):
        load_tuned_lens(ModelAdapter(llama_tiny), path=path)


def test_not_a_tuned_lens_file_is_rejected(llama_tiny, tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a tuned-lens file"):
        load_tuned_lens(ModelAdapter(llama_tiny), path=tmp_path / "x.pt")


@torch.no_grad()
def sampled_by_hand(model, tokenizer, num_texts: int, new_tokens: int, seed: int) -> list[str]:
    """Ancestral sampling written out: after ``torch.manual_seed(seed)``, for each generic opening in turn, its
    share of the texts as one batch, each step one ``torch.multinomial`` draw from the full softmax (temperature 1,
    no top-k); a sequence that drew the end-of-text token is padded from then on."""
    torch.manual_seed(seed)
    per_prompt = -(-num_texts // len(GENERIC_PROMPTS))
    eos = model.generation_config.eos_token_id
    texts = []
    for prompt in GENERIC_PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]] * per_prompt)
        done = torch.zeros(per_prompt, dtype=torch.bool)
        for _ in range(new_tokens):
            drawn = torch.multinomial(model(input_ids=ids).logits[:, -1].float().softmax(-1), 1)[:, 0]
            drawn = torch.where(done, tokenizer.pad_token_id, drawn)
            ids = torch.cat([ids, drawn[:, None]], dim=1)
            done |= drawn == eos
            if done.all():
                break
        texts.extend(tokenizer.batch_decode(ids, skip_special_tokens=True))
    return texts[:num_texts]


def test_out_of_domain_texts_are_the_models_own_samples_at_temperature_1(llama_tiny, tiny_tokenizer):
    got = sample_out_of_domain_texts(llama_tiny, tiny_tokenizer, 20, new_tokens=5, seed=3)
    assert len(got) == 20
    assert got == sampled_by_hand(llama_tiny, tiny_tokenizer, 20, new_tokens=5, seed=3)
    assert got != sampled_by_hand(llama_tiny, tiny_tokenizer, 20, new_tokens=5, seed=4)


class TextsSeen(Exception):
    """Raised by :class:`RecordingTokenizer` once it has the contexts: the audit need not run further."""


class RecordingTokenizer:
    """A tokenizer that records the first list of ``expected`` texts it is asked to tokenize (the audit's contexts)
    and stops there; everything else goes to the wrapped tokenizer."""

    def __init__(self, tokenizer, expected: int) -> None:
        self.tokenizer, self.expected, self.texts = tokenizer, expected, None

    def __call__(self, text, *args, **kwargs):
        if isinstance(text, list) and len(text) == self.expected:
            self.texts = text
            raise TextsSeen
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def builtin_words_tokenizer():
    """A word-level tokenizer over every word of the in-domain sets, so that their answers are one token each."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dipreg.stimuli import load_pairs

    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    texts = [t for name in IN_DOMAIN_SETS for p in load_pairs(name) for t in (p.ctx_a, p.ctx_b, p.t_pos, p.t_neg)]
    words = sorted({word for text in texts for word, _ in split.pre_tokenize_str(text)})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def audit_contexts(monkeypatch, tmp_path, tokenizer, pairs: str, *flags: str) -> list[str]:
    """The texts ``dipreg audit --pairs PAIRS`` hands the tokenizer as the model's contexts."""
    from dipreg import audit
    from dipreg.stimuli import load_pairs

    recording = RecordingTokenizer(tokenizer, 2 * len(load_pairs(pairs)))
    model = make_tiny_model("llama")
    monkeypatch.setattr(audit, "load_model", lambda _name: (model, recording))
    with pytest.raises(TextsSeen):
        audit.run_audit(None, pairs, out=tmp_path / pairs, **dict(zip(flags[::2], flags[1::2], strict=True)))
    return recording.texts


@pytest.mark.parametrize("style", [None, "raw"], ids=["audit-default", "raw"])
def test_in_domain_corpus_is_what_the_audit_shows_the_model(monkeypatch, tmp_path, style):
    """For the default style (fewshot: worked examples from the same set) and an explicit one, the in-domain corpus
    is the contexts the audit of each built-in set tokenizes for the model, in order."""
    tokenizer = builtin_words_tokenizer()
    flags = () if style is None else ("prompt", style)
    seen = [text for name in IN_DOMAIN_SETS for text in audit_contexts(monkeypatch, tmp_path, tokenizer, name, *flags)]
    corpus = in_domain_texts(tokenizer) if style is None else in_domain_texts(tokenizer, style)
    assert len(corpus) == 2 * (278 + 200)
    assert corpus == seen


def test_cli_trains_a_lens_that_the_audit_reads_with_all_three_lenses(
    llama_tiny, tiny_tokenizer, tiny_pairs, tmp_path, monkeypatch
):
    model_dir, corpus, pairs = tmp_path / "tiny-llama", tmp_path / "corpus.txt", tmp_path / "pairs.jsonl"
    llama_tiny.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    corpus.write_text("\n".join(TEXTS) + "\n")
    save_pairs(tiny_pairs, pairs)
    lens_dir = tmp_path / "lens"
    train = ["tuned-lens", "train", "--model", str(model_dir), "--corpus", str(corpus), "--out", str(lens_dir)]
    assert main([*train, "--steps", "5", "--vocab-top-k", "0"]) == 0
    log = json.loads((lens_dir / "train.json").read_text())
    assert log["meta"]["model_id"] == "tiny-llama" and len(log["losses"]) == 5
    audit = tmp_path / "audit"
    lenses = [
        "--lens",
        "logit,tuned,causal",
        "--tuned-lens",
        str(lens_dir),
        "--neutral-prompt",
        "cat cat\\ndog dog\\n?",
    ]
    # --prompt auto: tiny_pairs has one pair per family, too few for the default few-shot style's worked examples
    argv = ["audit", "--model", str(model_dir), "--pairs", str(pairs), "--prompt", "auto", *lenses, "--out", str(audit)]
    figures = saved_figures(monkeypatch, audit_module)
    assert main(argv) == 0
    payload = json.loads((audit / "audit.json").read_text())
    assert set(payload["lenses"]) == {"logit", "tuned", "causal"}
    assert payload["lens_options"]["causal"] == {"neutral_prompt": "cat cat\ndog dog\n?"}
    # lenses.png plots, per lens, the mean DiD and the mean output-aligned DiD of the items audit.json holds
    raw, aligned = figures["lenses.png"].axes
    for k, name in enumerate(["logit", "tuned", "causal"]):
        did = np.array([item["did"] for item in payload["lenses"][name]["items"]])
        sign = np.where(did[:, -1:] > 0, 1.0, -1.0)
        np.testing.assert_allclose(raw.lines[k].get_ydata(), did.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(aligned.lines[k].get_ydata(), (sign * did).mean(0), rtol=1e-5, atol=1e-6)
        assert raw.lines[k].get_label() == name
    assert_png_of(audit / "lenses.png", figures["lenses.png"])


def test_audit_without_a_trained_lens_names_the_fix(llama_tiny, tiny_tokenizer, tiny_pairs, tmp_path, capsys):
    model_dir, pairs = tmp_path / "tiny-llama", tmp_path / "pairs.jsonl"
    llama_tiny.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    save_pairs(tiny_pairs, pairs)
    args = ["audit", "--model", str(model_dir), "--pairs", str(pairs), "--lens", "tuned", "--tuned-lens", "in-domain"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "dipreg tuned-lens train --corpus in-domain" in capsys.readouterr().err


def _legacy_pickle(path):
    import pickle

    path.write_bytes(pickle.dumps({"meta": {}, "state_dict": {}}))


def _truncated(path):
    TunedLens(8, 32).save(path)
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.write_bytes(b""), "format: not a torch.save zip archive"),
        (lambda p: p.write_text("hello world"), "format: not a torch.save zip archive"),
        (_legacy_pickle, "format: not a torch.save zip archive"),
        (_truncated, "format: a truncated or damaged zip archive"),
        (lambda p: torch.save([1, 2], p), r"format: expected a dict with 'meta' and 'state_dict', got list"),
        (lambda p: torch.save({"meta": [], "state_dict": {}}, p), "metadata: 'meta' must be a dict"),
        (
            lambda p: torch.save({"meta": {"num_layers": 8, "hidden_size": 0}, "state_dict": {}}, p),
            "metadata field 'hidden_size' must be a positive integer, got 0",
        ),
        (
            lambda p: torch.save({"meta": {"num_layers": 2, "hidden_size": 4}, "state_dict": {"x": 1}}, p),
            r"keys: 2 missing \(translators\.0\.bias, translators\.0\.weight\), 1 unexpected \(x\)",
        ),
    ],
)
def test_every_damaged_lens_file_is_one_line_naming_the_file(tmp_path, write, message):
    from dipreg.lenses.tuned import TunedLensFileError

    path = tmp_path / "tuned-lens.pt"
    write(path)
    with pytest.raises(TunedLensFileError, match=message) as info:
        TunedLens.load(path)
    text = str(info.value)
    assert text.startswith(f"{path} is not a tuned-lens file dipreg can use") and "\n" not in text
    assert "weights_only" not in text and info.value.__cause__ is None


def test_a_mismatched_lens_names_its_file(llama_tiny, tmp_path):
    path = TunedLens(6, 32, {"model_id": "other"}).save(tmp_path / "lens" / "tuned-lens.pt")
    assert TunedLens.load(tmp_path / "lens").path == path
    with pytest.raises(ValueError, match=rf"^{path}: This tuned lens was trained for 6 layers"):
        load_tuned_lens(ModelAdapter(llama_tiny), path=tmp_path / "lens")


def hand_kl_over_top_k(model, hidden: torch.Tensor, top_k: int) -> torch.Tensor:
    """``KL(final ‖ layer ℓ)`` written out for raw residuals ``(L, 1, D)`` of one position under identity translators:
    the model's own final norm and head on every layer, both distributions renormalised on the ``top_k`` tokens of
    the final layer's distribution, summed over those tokens, averaged over layers 1..L−1."""
    logits = model.lm_head(model.model.norm(hidden[:, 0]))  # (L, V)
    keep = logits[-1].topk(top_k).indices
    final = logits[-1, keep].log_softmax(-1)
    layers = logits[:-1, keep].log_softmax(-1)
    return (final.exp() * (final - layers)).sum(-1).mean()


def test_default_loss_is_the_kl_over_the_top_64_tokens_of_the_final_distribution():
    """A vocabulary of 256, so that the top 64 are a real subset: the first loss of the default settings (identity
    translators) is the KL renormalised on the final layer's top 64 tokens, not the full-vocabulary KL."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    hidden = 3 * torch.randn(4, 1, 32)
    settings = TrainSettings(steps=1)
    assert settings.vocab_top_k == 64
    lens, losses = train_tuned_lens(ModelAdapter(model), hidden, settings)
    with torch.no_grad():
        want, full = hand_kl_over_top_k(model, hidden, 64), hand_kl_over_top_k(model, hidden, 256)
    assert lens.meta["vocab_size_used"] == 64
    assert losses[0] == pytest.approx(float(want), rel=1e-5)
    assert abs(float(full) - float(want)) > 1e-2 * float(want), "the top-64 KL must differ from the full one here"
