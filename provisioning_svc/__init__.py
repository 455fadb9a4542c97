"""Provisioning service: Deprovision."""
