# syntax=docker/dockerfile:1
#
# opsd in a container: built with the Rust image, run on distroless (glibc,
# no shell, no package manager) as a non-root user, with the redb store on a
# volume.
#
#   docker build -t opsd .
#   docker run -p 50051:50051 -v opsd-data:/var/lib/opsd opsd
#
# CI has no Docker engine: .ci/dockerfile-steps runs this file's build stage
# outside Docker (the same COPYs and RUNs, the target cache mount on the
# repository's target/) and starts the binary it produced as the final stage
# would, as user 65532, until its HEALTHCHECK passes. See README, "Running it
# in a stack".

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# What the build reads and nothing more. The [[test]] targets Cargo.toml
# declares must exist for cargo to load the manifest, so tests/*.rs come too
# (.dockerignore keeps the rest of tests/ out).
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY bench bench
COPY tests tests
# The target directory is a cache mount (it is in no layer), so the binary
# is copied out in the same step, without its line tables (20 MB instead of
# 110; panics still name their functions); out/data becomes the volume.
# Paths stay inside WORKDIR, so the step runs outside Docker as it is.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin opsd \
 && mkdir -p out/data \
 && strip --strip-debug -o out/opsd target/release/opsd

# glibc and libgcc of Debian 12, as the build stage's bookworm.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/out/opsd /usr/local/bin/opsd
# The store's directory belongs to the non-root user, so a new named volume
# mounted there starts out writable by opsd.
COPY --from=build --chown=65532:65532 /src/out/data /var/lib/opsd
USER 65532:65532
VOLUME ["/var/lib/opsd"]
# Listen on every interface of the container; the health check asks the
# loopback (`opsd ops` reads OPSD_SERVER).
ENV OPSD_LISTEN=0.0.0.0:50051 \
    OPSD_SERVER=127.0.0.1:50051
EXPOSE 50051
# GET /healthz: exit 0 when serving, 78 when not (draining) or unreachable.
HEALTHCHECK --interval=10s --timeout=6s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/opsd", "ops", "health"]
# SIGTERM drains in-flight calls (--drain-timeout, 30 s): give `docker stop`
# a longer timeout than that (`docker stop -t 40`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/opsd"]
CMD ["serve", "--store", "redb:/var/lib/opsd/opsd.redb", "--log-format", "json"]
