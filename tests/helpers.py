"""Shared test helpers: tiny seeded HF models built from configs, a local fake of the Hub upload API, and the
trainer's small-data diagnostics (warnings a tiny run is expected to raise)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import types
import warnings

import torch
import transformers as T

T.logging.set_verbosity_error()

#: FairTrainer's diagnostics that tiny test runs trigger by design (a few dozen rows, a handful of updates). Each is
#: asserted where a test makes it happen on purpose: test_selection.py (no eval set and too few rows, a blind
#: detector switches the adapter off, the selection keeps a harmful adapter off, a gate that rarely fires) and
#: test_trainer_defaults.py (the LoRA barely moved).
TINY_RUN_DIAGNOSTICS = (
    "No eval_dataset and too few training rows per group",
    "The bias detector could not learn to find the minority",
    "FairNet's gate is on for only",
    "The LoRA barely moved",
    "FairNet switched the adapter off",
    "FairNet kept the adapter off after the selection",
)
TINY_RUN_FILTERS = [f"ignore:{re.escape(m)}:UserWarning" for m in TINY_RUN_DIAGNOSTICS]


@contextlib.contextmanager
def expect_warnings(*required: str, allow: tuple = ()):
    """Record the block's warnings: each regex in `required` must match one of them; those matching `allow` are
    dropped; every other warning is emitted again, so it still reaches the test summary."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    messages = [str(w.message) for w in caught]
    for pattern in required:
        assert any(re.search(pattern, m) for m in messages), f"no warning matched {pattern!r}; got {messages}"
    for w in caught:
        if not any(re.search(p, str(w.message)) for p in (*required, *allow)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)


def tiny_model(kind: str, num_labels: int = 2, seed: int = 0):
    """A tiny, seeded sequence/image classifier built from a config (no download)."""
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = T.BertConfig(vocab_size=50, num_labels=num_labels, **TINY)
    elif kind == "roberta":
        cfg = T.RobertaConfig(vocab_size=50, num_labels=num_labels, pad_token_id=1, **TINY)
    elif kind == "distilbert":
        cfg = T.DistilBertConfig(vocab_size=50, dim=32, n_layers=4, n_heads=2, hidden_dim=64, num_labels=num_labels)
    elif kind == "llama":
        cfg = T.LlamaConfig(vocab_size=50, num_key_value_heads=2, pad_token_id=0, num_labels=num_labels, **TINY)
    elif kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=50, n_embd=32, n_layer=4, n_head=2, pad_token_id=0, num_labels=num_labels)
    elif kind == "vit":
        cfg = T.ViTConfig(image_size=16, patch_size=4, num_channels=3, num_labels=num_labels, **TINY)
        return T.ViTForImageClassification(cfg).eval()
    else:
        raise ValueError(kind)
    return T.AutoModelForSequenceClassification.from_config(cfg).eval()


def tiny_batch(kind: str, batch: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(3, 50, (batch, 10), generator=g)
    mask = torch.ones(batch, 10, dtype=torch.long)
    mask[1, 6:] = 0  # one padded row
    ids[1, 6:] = 0 if kind in ("bert", "distilbert", "llama", "gpt2") else 1
    return {"input_ids": ids, "attention_mask": mask}


class FakeHubApi:
    """Stands in for `huggingface_hub.HfApi` in push tests: commits land in a local folder, nothing leaves the box."""

    def __init__(self, root: str):
        self.root = root
        self.commits = []

    def create_repo(self, repo_id, **kwargs):
        os.makedirs(os.path.join(self.root, repo_id), exist_ok=True)
        return types.SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            dest = os.path.join(self.root, repo_id, op.path_in_repo)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy(op.path_or_fileobj, dest)
        self.commits.append((repo_id, [op.path_in_repo for op in operations]))
        return types.SimpleNamespace(commit_url=f"file://{self.root}/{repo_id}", oid="0" * 40)

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, allow_patterns=None, ignore_patterns=None,
                      **kwargs):
        """Uploads what the Hub client would: the folder's files filtered by its own allow/ignore patterns."""
        from huggingface_hub.utils import filter_repo_objects

        files = sorted(os.path.relpath(os.path.join(d, f), folder_path) for d, _, names in os.walk(folder_path)
                       for f in names)
        kept = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        for rel in kept:
            dest = os.path.join(self.root, repo_id, path_in_repo or "", rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy(os.path.join(folder_path, rel), dest)
        self.commits.append((repo_id, kept))
        return types.SimpleNamespace(commit_url=f"file://{self.root}/{repo_id}", oid="0" * 40)


def install_fake_hub(monkeypatch, root: str) -> FakeHubApi:
    """Replace every Hub client the push path can reach with a local `FakeHubApi`."""
    import huggingface_hub
    import transformers.utils.hub as thub

    api = FakeHubApi(root)
    monkeypatch.setattr(thub, "hf_api", lambda *a, **k: api, raising=False)
    monkeypatch.setattr(thub, "create_repo", api.create_repo, raising=False)
    monkeypatch.setattr(thub, "create_commit", api.create_commit, raising=False)
    monkeypatch.setattr(huggingface_hub, "create_repo", api.create_repo)
    monkeypatch.setattr(huggingface_hub, "create_commit", api.create_commit)
    monkeypatch.setattr(huggingface_hub, "upload_folder", api.upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: api.create_repo(*a, **k))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, *a, **k: api.create_commit(*a, **k))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, *a, **k: api.upload_folder(*a, **k))
    return api


class CustomCheckpointed(torch.nn.Module):
    """A custom model that calls torch's checkpoint itself (not through transformers): its recomputation, during
    backward, finds the gate through the pass the block saw or the last published one."""

    def __init__(self, use_checkpoint: bool):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 2)
        self.use_checkpoint = use_checkpoint

    def _block(self, h):
        return torch.tanh(self.mid(h)) * h

    def forward(self, x):
        h = torch.relu(self.inp(x))
        if self.use_checkpoint:
            h = torch.utils.checkpoint.checkpoint(self._block, h, use_reentrant=False)
        else:
            h = self._block(h)
        return self.out(h)
