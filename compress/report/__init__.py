"""The report: schema, rendering, and (later) gates."""
