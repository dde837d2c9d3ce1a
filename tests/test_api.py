"""The author's surface: one import, and a scoring phase that trains and is undone."""
from __future__ import annotations

from peftbench import api
from peftbench.contract import selector


def test_the_authors_names_come_from_one_module():
    for name in api.__all__:
        assert hasattr(api, name), name
    assert selector.Selector.__module__ == "peftbench.contract.selector"


def test_scoring_session_trains_then_restores_everything(tiny_model):
    """A fine-tune inside the session moves the weights; on exit parameters, buffers,
    requires_grad and train mode are as before, bit for bit, even after an error."""
    from peftbench.contract.scoring import ScoringData
    from peftbench.contract.settings import TrainConfig
    from peftbench.data.encode import tokenize
    from peftbench.data.tasks import load_task
    from peftbench.training.checks import state_digests
    from peftbench.training.trainer import make_loader, pick_device

    model, tokenizer = tiny_model
    model.eval()
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    task = load_task("rte")
    data = tokenize(task, tokenizer, task.load_splits(limit=8), 32)
    scoring = ScoringData(make_loader(data["train"], tokenizer, task, 4, True, 0), task, pick_device("cpu"),
                          TrainConfig(lr=1e-2))
    before, flags = state_digests(model), {n: p.requires_grad for n, p in model.named_parameters()}
    moved = False
    try:
        with api.scoring_session(model, scoring, steps=2, train_head=True) as (optimizer, scheduler):
            assert model.training
            for batch in scoring.batches():
                scoring.loss(model, batch).backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            now = state_digests(model)
            moved = now != before and now["classifier.weight"] != before["classifier.weight"]  # the head trained
            raise RuntimeError("a scoring bug")
    except RuntimeError:
        pass
    assert moved
    assert state_digests(model) == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
