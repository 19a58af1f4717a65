"""The target side: connections, the embedded server, the tables and their audit rows, the
standbys, and the load of a backup into PostgreSQL (binary COPY, one transaction)."""
