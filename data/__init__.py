"""Data layer: records, dataset adapters, the workspace format and the synthetic CIR world."""
