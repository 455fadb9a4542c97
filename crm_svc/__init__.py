"""CRM service: PipelineSummary."""
