"""Images: the catalog, inspection of base images, and per-job disks."""
