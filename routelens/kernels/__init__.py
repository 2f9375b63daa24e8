"""routelens.kernels: fused masked-routing kernels and their PyTorch reference. Installed as routelens.kernels."""
