"""Spectral-graph method: Laplacian, filters, and the training-time gradient filter."""
import numpy as np
import torch

from peftbench.contract import registry
from peftbench.methods.spectral import filter_matrix, normalized_laplacian, similarity_graph


def _random_graph(seed=0, k=12):
    rng = np.random.default_rng(seed)
    return similarity_graph(rng.normal(size=(k, 30)), neighbours=4)


def test_laplacian_is_psd_with_the_right_null_space():
    w = _random_graph()
    w = w + 0.01 * (np.ones_like(w) - np.eye(len(w)))  # connected
    lap = normalized_laplacian(w)
    lam, u = np.linalg.eigh(lap)
    assert lam.min() > -1e-10 and lam.max() <= 2 + 1e-10
    assert np.sum(lam < 1e-9) == 1  # one component -> one zero eigenvalue
    null = np.sqrt(w.sum(1))
    np.testing.assert_allclose(lap @ null, 0, atol=1e-10)


def test_null_space_dimension_is_the_number_of_components():
    w = np.zeros((6, 6))
    w[0, 1] = w[1, 0] = w[1, 2] = w[2, 1] = 1.0
    w[3, 4] = w[4, 3] = w[4, 5] = w[5, 4] = 1.0
    lam = np.linalg.eigvalsh(normalized_laplacian(w))
    assert np.sum(np.abs(lam) < 1e-9) == 2


def test_graph_is_symmetric_nonnegative_without_self_loops():
    w = _random_graph(1)
    assert np.allclose(w, w.T) and (w >= 0).all() and np.allclose(np.diag(w), 0)


def test_allpass_is_identity_and_lowpass_removes_high_frequencies():
    n = 20  # a path graph
    w = np.zeros((n, n))
    for i in range(n - 1):
        w[i, i + 1] = w[i + 1, i] = 1.0
    lap = normalized_laplacian(w)
    lam, u = np.linalg.eigh(lap)
    low, high = u[:, 1], u[:, -1]
    signal = low + high
    np.testing.assert_allclose(filter_matrix(lap, "allpass") @ signal, signal, atol=1e-10)
    ideal = filter_matrix(lap, "ideal", cutoff=1.0) @ signal
    np.testing.assert_allclose(ideal, low, atol=1e-10)
    smooth = filter_matrix(lap, "tikhonov", gamma=5.0) @ signal
    assert abs(smooth @ high) < 0.2 * abs(smooth @ low)


def _prepared(tiny_model_dir, **params):
    from peftbench.contract.scoring import ScoringData
    from peftbench.data.encode import tokenize
    from peftbench.data.tasks import load_task
    from peftbench.modeling.models import load_model
    from peftbench.training.trainer import make_loader, pick_device

    task = load_task("rte")
    model, tokenizer = load_model(tiny_model_dir, 2)
    data = tokenize(task, tokenizer, task.load_splits(limit=16), 64)
    scoring = ScoringData(make_loader(data["train"], tokenizer, task, 4, True, 0), task, pick_device("cpu"))
    method = registry.create("spectral", batches=3, neighbours=4, **params)
    scores = method.score(model, scoring)
    selection = method.select(model, scores, 3000, torch.Generator())
    return method, method.apply(model, selection), selection, scores


def _random_grads(method) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(trainable tensor, a copy of the random gradient just given it) per trained node."""
    pairs = []
    for t, _ in method._trainable:
        if t is not None:
            t.grad = torch.randn_like(t)
            pairs.append((t, t.grad.clone()))
    return pairs


def test_allpass_gradient_filter_is_the_identity(tiny_model_dir):
    method, model, _, _ = _prepared(tiny_model_dir, filter="allpass", train_filter=True)
    pairs = _random_grads(method)
    method.after_backward(model, 0)
    for t, given in pairs:
        torch.testing.assert_close(t.grad, given)


def test_selection_is_exact_and_regulariser_matches_formula(tiny_model_dir):

    method, model, selection, scores = _prepared(tiny_model_dir, mu=2.0)
    assert selection.count({n: s.numel() for n, s in scores.items()}) == 3000
    assert method.loss_term(model, 0).detach().item() == 0.0  # nothing moved yet
    for t, _ in method._trainable:
        if t is not None:
            with torch.no_grad():
                t.add_(0.1)
    s = torch.stack([torch.tensor(0.0) if t is None else torch.tensor(0.01) for t, _ in method._trainable])
    expected = 2.0 * s @ torch.tensor(method.laplacian_, dtype=torch.float32) @ s
    torch.testing.assert_close(method.loss_term(model, 0), expected, rtol=1e-4, atol=1e-9)


def test_by_default_it_trains_its_selection_like_any_subset(tiny_model_dir):
    """The training-time parts measured inert are off by default: no loss term, gradients
    untouched by the (low-pass) filter; with `train_filter` the same gradients are rescaled."""
    method, model, _, _ = _prepared(tiny_model_dir)
    assert method.loss_term(model, 0) is None
    pairs = _random_grads(method)
    method.after_backward(model, 0)
    assert all(torch.equal(t.grad, given) for t, given in pairs)
    method.train_filter = True
    method.after_backward(model, 0)
    assert not all(torch.equal(t.grad, given) for t, given in pairs)
