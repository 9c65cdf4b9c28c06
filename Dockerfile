# The image deploy/kubernetes/ runs: this repository at /app, installed by `make setup` (the Makefile is the one
# place that defines the install), on Ray's image, as its user ray (uid 1000, group users: gid 100).
# `make image` builds it; docs/cluster.md says how to push and name it.
#   GPU (default): BASE=rayproject/ray:2.60.0-py311-gpu TORCH_INDEX=https://download.pytorch.org/whl/cu128 EXTRAS=gpu
#   CPU:           BASE=rayproject/ray:2.60.0-py311-cpu TORCH_INDEX=https://download.pytorch.org/whl/cpu EXTRAS=
ARG BASE=rayproject/ray:2.60.0-py311-gpu

FROM ${BASE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG EXTRAS=gpu
USER 0
# make runs the install; the base image may not have it. Its version is whatever the base image's Ubuntu ships.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/* \
    && mkdir /app && chown 1000:100 /app
USER 1000:100
WORKDIR /app
COPY --chown=1000:100 Makefile pyproject.toml constraints.txt README.md ./
COPY --chown=1000:100 components components
COPY --chown=1000:100 deploy deploy
COPY --chown=1000:100 bench bench
COPY --chown=1000:100 flows flows
COPY --chown=1000:100 data data
RUN make setup PYTHON=python3 TORCH_INDEX=${TORCH_INDEX} EXTRAS=${EXTRAS}

FROM ${BASE}
COPY --from=build --chown=1000:100 /app /app
WORKDIR /app
ENV PATH=/app/.venv/bin:${PATH} \
    VIRTUAL_ENV=/app/.venv
