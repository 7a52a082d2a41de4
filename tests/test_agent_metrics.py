"""pass@k / pass^k against hand-computed values, and the failure taxonomy's first-error rule."""

import pytest

from glm5.agent.eval.metrics import classify, pass_at_k, pass_hat_k


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 2, 1, 0.5),          # c/n
    (4, 2, 2, 1 / 6),        # C(2,2)/C(4,2) = 1/6
    (4, 3, 2, 3 / 6),        # C(3,2)/C(4,2) = 3/6
    (5, 3, 3, 1 / 10),       # C(3,3)/C(5,3) = 1/10
    (4, 4, 4, 1.0),
    (4, 3, 4, 0.0),          # one failure among 4: not all 4 succeed
    (8, 5, 4, 5 / 70),       # C(5,4)/C(8,4) = 5/70
])
def test_pass_hat_k_hand_computed(n, c, k, expected):
    assert pass_hat_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 2, 1, 0.5),
    (4, 2, 2, 1 - 1 / 6),    # 1 - C(2,2)/C(4,2)
    (4, 1, 2, 1 - 3 / 6),    # 1 - C(3,2)/C(4,2)
    (5, 1, 3, 1 - 4 / 10),   # 1 - C(4,3)/C(5,3)
    (4, 0, 4, 0.0),
    (4, 1, 4, 1.0),          # any success among all n: pass@n = 1
    (8, 2, 4, 1 - 15 / 70),  # 1 - C(6,4)/C(8,4)
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_bounds_are_checked():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_hat_k(4, 2, 5)


def test_first_error_decides_the_class():
    errors = [{"kind": "bad_arguments", "position": 3, "tool": "sql"}, {"kind": "unknown_tool", "position": 5},
              {"kind": "step_limit", "position": 9}]
    assert classify(errors, "wrong_answer") == "bad_arguments"
    assert classify([], "fabricated") == "fabricated"
    assert classify([{"kind": "model_error"}], None) == "endpoint_error"


def test_recovered_tool_error_does_not_count():
    error = {"kind": "tool_error", "position": 4, "tool": "python"}
    # a later python call succeeded: recovered, so the verifier's verdict decides
    assert classify([error], "wrong_answer", [(4, "python", False), (7, "python", True)]) == "wrong_answer"
    # only an earlier success, or a success of another tool: unrecovered
    assert classify([error], "wrong_answer", [(2, "python", True), (4, "python", False), (7, "sql", True)]) \
        == "tool_error_unrecovered"
