# The image deploy/kubernetes/ runs: this repository at /app, installed by `make setup` (the Makefile is the one
# place that defines the install), on Ray's image. `make image` builds it; see README.md, "The container image".
#   GPU (default): BASE=rayproject/ray:2.60.0-py311-gpu TORCH_INDEX=https://download.pytorch.org/whl/cu128 EXTRAS=gpu
#   CPU:           BASE=rayproject/ray:2.60.0-py311-cpu TORCH_INDEX=https://download.pytorch.org/whl/cpu EXTRAS=
ARG BASE=rayproject/ray:2.60.0-py311-gpu

FROM ${BASE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG EXTRAS=gpu
USER root
# make runs the install; the base image may not have it.
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/* \
    && mkdir /app && chown ray:users /app
USER ray
WORKDIR /app
COPY --chown=ray:users Makefile pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users components components
COPY --chown=ray:users deploy deploy
COPY --chown=ray:users bench bench
COPY --chown=ray:users flows flows
COPY --chown=ray:users data data
RUN make setup PYTHON=python3 TORCH_INDEX=${TORCH_INDEX} EXTRAS=${EXTRAS}

FROM ${BASE}
COPY --from=build --chown=ray:users /app /app
WORKDIR /app
ENV PATH=/app/.venv/bin:${PATH} \
    VIRTUAL_ENV=/app/.venv
