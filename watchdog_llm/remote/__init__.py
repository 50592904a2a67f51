"""LAN controller mode: model hosts driven over SSH (asyncssh)."""
