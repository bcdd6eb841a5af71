"""Ray bootstrap: the embedded local cluster, a real multi-node cluster on loopback, Jobs API submission,
resource profiles and DeepSpeed configs."""
