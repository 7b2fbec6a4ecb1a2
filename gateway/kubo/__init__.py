"""Talking to Kubo: the RPC client, the managed node, CIDs and record blocks."""
