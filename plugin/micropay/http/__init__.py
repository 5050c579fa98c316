"""What every HTTP edge of micropay shares (the sidecar, the purchases API): answering
a domain error as an RFC 9457 problem response."""
