"""Work pools, deployments and the local stack (`make up`, `make down`, `make demo`)."""
