"""The Kubernetes CSI node plugin (``scratchd csi``, docs/kubernetes.md); needs the ``csi`` extra (gRPC)."""
