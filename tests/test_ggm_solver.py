"""GGM-l2,g solver: monotone BCD, support recovery, and the convex case against another solver."""
import numpy as np
import pytest

from peftbench.methods.ggm import objective, solve_ggm, surrogate


def _synthetic(n=4000, seed=0):
    """Sparse true precision: important nodes {0, 1} interact with {2, 3} only; 4..7 do not."""
    k = 8
    theta = np.eye(k) * 2.0
    for i, j in [(0, 2), (1, 3), (0, 3)]:
        theta[i, j] = theta[j, i] = 0.6
    theta[4, 5] = theta[5, 4] = 0.5  # structure outside the penalised blocks
    rng = np.random.default_rng(seed)
    x = rng.multivariate_normal(np.zeros(k), np.linalg.inv(theta), size=n)
    return np.cov(x, rowvar=False), [0, 1]


@pytest.mark.parametrize("kind", ["l1", "log", "etp", "lp"])
def test_objective_is_non_increasing_and_converges(kind):
    s, important = _synthetic(500)
    _, _, history = solve_ggm(s, important, lam=2.0, tau=0.05, kind=kind, max_iter=300)
    assert all(b <= a + 1e-9 for a, b in zip(history, history[1:]))
    assert len(history) < 301  # stopped on tolerance


@pytest.mark.parametrize("kind", ["l1", "lp", "etp", "log"])
def test_support_recovered_on_an_easy_instance(kind):
    s, important = _synthetic()
    tau = {"l1": 0.1, "lp": 0.1, "etp": 0.1, "log": 0.05}[kind]
    _, delta, _ = solve_ggm(s, important, lam=5.0, tau=tau, kind=kind)
    norms = {j: np.linalg.norm(delta[important, j]) for j in range(2, 8)}
    assert {j for j, v in norms.items() if v > 1e-8} == {2, 3}


def test_nonconvex_surrogate_shrinks_strong_edges_less_than_l1():
    s, important = _synthetic()
    _, d_l1, _ = solve_ggm(s, important, lam=5.0, tau=0.1, kind="l1")
    _, d_etp, _ = solve_ggm(s, important, lam=5.0, tau=0.1, kind="etp")
    assert np.linalg.norm(d_etp[important, 3]) > np.linalg.norm(d_l1[important, 3])


def _proximal_gradient(s, important, lam, tau, steps=20000, lr=0.01):
    """Convex l2,1 case by proximal gradient on the joint variable (Omega, Delta)."""
    k = len(s)
    others = [j for j in range(k) if j not in important]
    omega, delta = np.eye(k), np.eye(k)
    for _ in range(steps):
        g_omega = -np.linalg.inv(omega) + s + 2 * lam * (omega - delta)
        g_delta = -2 * lam * (omega - delta)
        omega = omega - lr * (g_omega + g_omega.T) / 2
        delta = delta - lr * g_delta
        block = delta[np.ix_(important, others)]
        norms = np.linalg.norm(block, axis=0)
        shrink = np.maximum(0, 1 - lr * tau / np.maximum(norms, 1e-300))
        delta[np.ix_(important, others)] = block * shrink
    return omega, delta


def test_l21_matches_a_proximal_gradient_solution():
    s, important = _synthetic(300, seed=3)
    lam, tau = 1.0, 0.2
    omega, delta, history = solve_ggm(s, important, lam=lam, tau=tau, kind="l1", tol=1e-13, max_iter=5000)
    omega2, delta2 = _proximal_gradient(s, important, lam, tau)
    g = surrogate("l1")
    assert history[-1] == pytest.approx(objective(omega2, delta2, s, important, lam, tau, g), abs=1e-6)
    np.testing.assert_allclose(omega, omega2, atol=1e-3)
    np.testing.assert_allclose(delta, delta2, atol=1e-3)


def _ggm_setup(tiny_model_dir, **params):
    from peftbench.contract import registry
    from peftbench.contract.scoring import ScoringData
    from peftbench.data.encode import tokenize
    from peftbench.data.tasks import load_task
    from peftbench.modeling.models import load_model
    from peftbench.training.trainer import make_loader, pick_device

    task = load_task("rte")
    model, tokenizer = load_model(tiny_model_dir, 2)
    data = tokenize(task, tokenizer, task.load_splits(limit=24), 64)
    scoring = ScoringData(make_loader(data["train"], tokenizer, task, 4, True, 0), task, pick_device("cpu"))
    method = registry.create("ggm", rank=4, batches=6, important=5, **params)
    return method, model, scoring, data, tokenizer, task


def test_ggm_reparametrised_model_equals_the_original_at_init(tiny_model_dir):
    import torch

    from peftbench.modeling.compute import forward
    from peftbench.modeling.models import head_parameters, pretrained_parameters
    from peftbench.modeling.sparse import count_trainable
    from peftbench.training.trainer import make_loader

    method, model, scoring, data, tokenizer, task = _ggm_setup(tiny_model_dir)
    model.eval()
    batch = next(iter(make_loader(data["test"], tokenizer, task, 4, False, 0)))
    reference = forward(model, batch, task).detach()
    pre, head = set(pretrained_parameters(model)), set(head_parameters(model))
    scores = method.score(model, scoring)
    selection = method.select(model, scores, 2000, torch.Generator())
    assert selection.notes["bcd_objective"][1] <= selection.notes["bcd_objective"][0]
    model = method.apply(model, selection)
    model.eval()
    assert torch.equal(forward(model, batch, task), reference)
    counts = count_trainable(model, pre, head)
    pcs = sum(len(c) for c in method._components.values())
    assert pcs > 0 and counts["new"] == pcs * (32 + 32)  # hidden 32: u_i and s_i v_i
    assert counts["trainable"] <= 2000
    assert selection.notes["nodes_chosen"] >= 5  # the important nodes at least


def test_ggm_budget_fill_respects_costs(tiny_model_dir):
    import torch

    method, model, scoring, *_ = _ggm_setup(tiny_model_dir, surrogate="l1")
    scores = method.score(model, scoring)
    for budget in (100, 640, 5000):
        sel = method.select(model, scores, budget, torch.Generator())
        pcs = sum(len(c) for c in method._components.values())
        spent = pcs * 64 + sum(32 if "intermediate" not in n else 64 for n in sel.full)
        assert spent <= budget


def test_ggm_important_nodes_scale_with_the_budget_and_a_full_pool_is_flagged(tiny_model_dir):
    """The authors budget K nodes, half of them important: at each budget the important count is
    half of what it holds; a budget above a third of the pool is 'pool exhausted'."""
    import torch

    method, model, scoring, *_ = _ggm_setup(tiny_model_dir)
    method.important = None
    scores = method.score(model, scoring)
    costs = scores["node_cost"].numpy()
    pool = int(costs.sum())
    counts = []
    for budget in (pool // 10, pool // 4, pool // 2):
        sel = method.select(model, scores, budget, torch.Generator())
        counts.append(sel.notes["important"])
        assert counts[-1] == max(int(budget // costs.mean()) // 2, 1)
        assert method.training_record()["pool_exhausted"] == (3 * budget > pool)
    assert counts[0] < counts[1] < counts[2]
    assert method.training_record()["flags"][0].startswith("pool exhausted")


def test_ggm_choice_is_not_a_random_order_of_the_others(tiny_model_dir):
    """Inside the design range (budget <= a third of the pool) the GGM's nodes beyond the
    important ones differ from those of random orders of the non-important nodes."""
    import torch

    method, model, scoring, *_ = _ggm_setup(tiny_model_dir, surrogate="l1")
    method.important, method.lam, method.tau = None, 1.0, 0.05
    method.batches = 12
    scores = method.score(model, scoring)
    costs = scores["node_cost"].numpy()
    budget = int(costs.sum()) // 3
    node_score, important, _ = method.node_scores(scores, budget)

    def fill(order):
        left, chosen = budget, set()
        for j in order:
            if costs[j] <= left:
                chosen.add(j)
                left -= costs[j]
        return chosen - set(important)

    ggm = fill(sorted(range(len(costs)), key=lambda j: -node_score[j]))
    others = [j for j in range(len(costs)) if j not in set(important)]
    rng = np.random.default_rng(0)
    overlaps = []
    for _ in range(20):
        chosen = fill(list(important) + list(rng.permutation(others)))
        overlaps.append(len(ggm & chosen) / len(ggm | chosen))
    assert ggm and max(overlaps) < 0.9
