"""The work that compares and carries sessions between both sides: reconcile and the app's own
check, the live cutover's catch-up, rollback and the overlap's, and the analysis queries."""
