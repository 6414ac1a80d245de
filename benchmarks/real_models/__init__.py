"""Real-model exports and measurements (development only: they need torch/timm); see benchmarks/README.md."""
