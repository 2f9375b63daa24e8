"""routelens.analyses: analyses over traces (one module per published method). Installed as routelens.analyses."""
