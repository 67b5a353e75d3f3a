"""The server's fleet side: field trials (and the federated coordinator) over real device agents.

Training code (`toolkit` outside this package) never imports it (import-linter checks that).
"""
