"""The client address the web pods go by (sign-in lockouts, /metrics) cannot be named by any pod
in the cluster: uvicorn believes X-Forwarded-For only from the pod network, and a NetworkPolicy
lets only the ingress controller and Prometheus reach the web pods."""

from __future__ import annotations

import ipaddress

from tests.deploy.test_manifests import objects, rendered  # noqa: F401 - the rendered fixture


def test_web_pods_believe_forwarded_addresses_only_from_the_proxy(rendered):  # noqa: F811
    config = objects(rendered, "production", "ConfigMap")["tuneplex-config"]["data"]
    trusted = config["FORWARDED_ALLOW_IPS"].split(",")
    assert "*" not in trusted
    assert all(ipaddress.ip_network(net).is_private for net in trusted), trusted
    web = objects(rendered, "production", "Deployment")["web"]
    container = web["spec"]["template"]["spec"]["containers"][0]
    assert "FORWARDED_ALLOW_IPS" not in {e["name"] for e in container.get("env", [])}
    assert {"configMapRef": {"name": "tuneplex-config"}} in container["envFrom"]

    policies = [p for p in objects(rendered, "production", "NetworkPolicy").values()
                if p["spec"]["podSelector"]["matchLabels"].get(
                    "app.kubernetes.io/component") == "web"]
    assert len(policies) == 1 and policies[0]["spec"]["policyTypes"] == ["Ingress"]
    sources = [source for rule in policies[0]["spec"]["ingress"] for source in rule["from"]]
    assert all(set(source) == {"namespaceSelector"} for source in sources), sources
    namespaces = {s["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                  for s in sources}
    assert namespaces == {"ingress-nginx", "monitoring"}
