"""Everything that talks to libvirt: the connection wrapper and the domain XML builder."""
