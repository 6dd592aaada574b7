# syntax=docker/dockerfile:1
# Burrow container image: a drop-in for http-event-relay's image (listens on port 80).
#
#   docker build -t burrow .
#   docker run -p 8080:80 -e REDIS_HOST=my-redis burrow
#
# Every setting comes from the environment at run time (see README.md); nothing is baked in.
# Needs BuildKit (the default builder since Docker 23) for `RUN --mount`.

# ---- build ----------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
# No debug info in the image's binary (the profile keeps it for profiling): ~18 MB instead of ~137.
ENV CARGO_PROFILE_RELEASE_DEBUG=0
# cmake and a C compiler build zlib-ng for Pingora.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# Dependencies first, against dummy crates, so that editing Burrow's sources reuses this layer.
# The workspace's other member (the load generator) must be there for cargo to read the
# workspace; only its manifest is needed, and it is not built.
COPY Cargo.toml Cargo.lock ./
COPY loadtest/loadgen/Cargo.toml loadtest/loadgen/
RUN mkdir src loadtest/loadgen/src \
 && echo 'fn main() {}' > src/main.rs \
 && cp src/main.rs loadtest/loadgen/src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin burrow \
 && rm -rf src target/release/burrow* target/release/deps/burrow-* target/release/deps/libburrow-* \
           target/release/.fingerprint/burrow-*

# The real sources (conf/burrow.yaml, src/http/demo.html and the Lua scripts are compiled in).
COPY . .
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin burrow

# ---- run ------------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# The binary is copied in and given cap_net_bind_service in ONE layer (a COPY followed by setcap
# would store it twice, and COPY --from does not reliably keep file capabilities), so the non-root
# user can bind port 80. libcap2-bin is only needed for setcap and is removed again.
# The capability is permitted only (`+p`, not `+ep`): `burrow serve` makes it effective itself. A
# binary given it as effective would not even start where the container's bounding set lacks it
# (`--cap-drop ALL`); this one starts, and refuses port 80 with a line saying what to do.
RUN --mount=type=bind,from=builder,source=/src/target/release/burrow,target=/tmp/burrow \
    apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libcap2-bin tini \
 && install -m 0755 /tmp/burrow /usr/local/bin/burrow \
 && setcap cap_net_bind_service=+p /usr/local/bin/burrow \
 && apt-get purge -y --auto-remove libcap2-bin \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 burrow \
 && useradd --system --uid 10001 --gid burrow --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin burrow

ENV BURROW_LISTEN=0.0.0.0:80
EXPOSE 80
USER 10001:10001

# No curl in the image: bash's /dev/tcp asks GET /health on the port of BURROW_LISTEN.
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${BURROW_LISTEN##*:} && printf 'GET /health HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r status <&3 && [[ $status == 'HTTP/1.'?' 200'* ]]"]

# tini as PID 1 passes signals on and reaps what `burrow worker`'s job commands leave behind (a
# background process of theirs, orphaned, becomes PID 1's child: burrow would leave it a zombie).
ENTRYPOINT ["/usr/bin/tini", "--", "burrow"]
CMD ["serve"]
