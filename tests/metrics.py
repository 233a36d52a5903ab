"""Reading a real /metrics: the samples of one scrape, and the difference between two."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


class Scrape(dict):
    """(sample name, frozenset of label pairs) -> value."""

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; a missing one fails the test (a metric renamed,
        gone or never recorded is not a zero)."""
        key = (name, frozenset(labels.items()))
        if key not in self:
            named = sorted(dict(pairs) for n, pairs in self if n == name)
            raise AssertionError(f"no sample {name} {labels} in the scrape; of that name: {named}")
        return self[key]

    def before(self, name: str, **labels: str) -> float:
        """A baseline: 0 when absent (a labelled counter nothing has touched yet is not exported).
        The later scrape it is compared with is read with :meth:`value`, which fails when absent."""
        return self.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over samples whose labels include these; none at all fails the test."""
        wanted = set(labels.items())
        found = [v for (n, pairs), v in self.items() if n == name and wanted <= pairs]
        assert found, f"no sample {name} {labels} in the scrape"
        return sum(found)


def scrape(url: str, token: str | None = None) -> Scrape:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(url, headers=headers, timeout=30)
    assert response.status_code == 200, (url, response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("text/plain")
    samples = Scrape()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples
