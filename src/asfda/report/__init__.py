"""Reports: learning curves and tables."""
