"""The benchmark suite: ``crmflow bench`` measures the targets of docs/design.md."""
