"""The ``kubernetes://<namespace>`` registry: ModelCacheEntry custom resources (DESIGN section 3).

``registry`` holds the schema and the protocol (see its docstring), ``api`` a small REST client
on httpx2, ``config`` the in-cluster and kubeconfig loading.  This package is imported only when
the scheme is used, so httpx2 and PyYAML (the ``kubernetes`` extra) are needed only then.
"""

from __future__ import annotations

from mxfs.registry.kubernetes.registry import KubernetesRegistry, open_url

__all__ = ["KubernetesRegistry", "open_url"]
