"""The service's chores."""
