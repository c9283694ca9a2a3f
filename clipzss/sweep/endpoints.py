"""Where a Ray cluster's shared services are, found through Ray itself instead of typed in by hand.

A head started from ``cluster/cluster.yaml`` runs the cluster's one MLflow tracking server and publishes its port as
a label of the head's Ray node (``ray start --head --labels=clipzss/mlflow-port=5000``). A driver connected to that
cluster (``ray.init(address=...)``) builds the server's address from the labelled node's IP, the address every other
node reaches the head at, and hands it to every trial: no ``HEAD_PRIVATE_IP`` to edit, and no node logs to a store of
its own that vanishes with it. A cluster without the label (``ray.init()`` on one machine, ``cluster/local.yaml``)
has no server to share: the caller keeps its own default.
"""

from __future__ import annotations

MLFLOW_PORT_LABEL = "clipzss/mlflow-port"


def cluster_tracking_uri() -> str | None:
    """``http://<node ip>:<port>`` of the MLflow server the connected cluster publishes, or None when it has none.

    Call after ``ray.init``. Raises RuntimeError when Ray is not connected, or when two live nodes publish different
    servers (the trials of one sweep must share one).
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("cluster_tracking_uri(): connect to the cluster first (ray.init(address=...))")
    servers = {
        f"http://{node['NodeManagerAddress']}:{node['Labels'][MLFLOW_PORT_LABEL]}"
        for node in ray.nodes()
        if node["Alive"] and MLFLOW_PORT_LABEL in (node.get("Labels") or {})
    }
    if len(servers) > 1:
        raise RuntimeError(f"label {MLFLOW_PORT_LABEL}: several nodes publish an MLflow server: {sorted(servers)}")
    return servers.pop() if servers else None
