"""Trust: image signatures, the trust store, measured launch, access control and the audit log."""
