"""Data: sources, the batch schema, and the Grain pipeline that feeds each host its slice."""
