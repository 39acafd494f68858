"""The apply path: events and admin triggers become transitions, history, mails and markers in one transaction."""
