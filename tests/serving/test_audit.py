"""Failed authentication is audited within a budget per client address: anyone can send requests without a key."""

from medvision.serving import audit
from medvision.serving.audit import FailureBudget


def test_failures_past_the_budget_are_counted_into_the_next_row(monkeypatch):
    now = [600.0]
    monkeypatch.setattr(audit.time, "monotonic", lambda: now[0])
    budget = FailureBudget(per_minute=3, max_addresses=3)
    assert [budget.take("10.0.0.1") for _ in range(5)] == [0, 0, 0, None, None]
    assert budget.take("10.0.0.2") == 0  # another address has its own budget
    now[0] += 60
    assert budget.take("10.0.0.1") == 2  # the next minute: written, with the two left out
    assert budget.take("10.0.0.1") == 0
    budget.take("10.0.0.3")
    now[0] += 60
    budget.take("10.0.0.4")  # past max_addresses: the addresses of earlier minutes are forgotten (memory is bounded)
    assert set(budget._seen) == {"10.0.0.4"}
