"""The benchmark suite: ``crmflow bench`` measures DESIGN section 6's targets P1-P6."""
