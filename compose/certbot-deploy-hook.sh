#!/usr/bin/env bash
# certbot deploy hook for compose/node.yml: copies a renewed certificate where the broker's
# container (uid 10001) can read it, and makes the broker load it without a restart.
#
#   certbot certonly --standalone -d node1.example.net \
#     --deploy-hook /opt/jetmq/compose/certbot-deploy-hook.sh
#
# certbot runs it after every issue or renewal with RENEWED_LINEAGE set to
# /etc/letsencrypt/live/<name>. certbot's own files stay root-only (0600 key, 0700 archive);
# the copies in JETMQ_TLS_DIR (default /etc/jetmq/tls) are owned by uid 10001, the key mode
# 0600. Files are replaced by rename, so the broker never reads a half-written key.
# Environment: JETMQ_TLS_DIR, JETMQ_UID (10001), JETMQ_COMPOSE_DIR (/opt/jetmq),
# JETMQ_NODE_ENV (/etc/jetmq/node.env).
set -euo pipefail

src="${RENEWED_LINEAGE:?run by certbot as --deploy-hook (RENEWED_LINEAGE is not set)}"
dst="${JETMQ_TLS_DIR:-/etc/jetmq/tls}"
uid="${JETMQ_UID:-10001}"

install -d -m 0700 -o "$uid" -g "$uid" "$dst"
for f in fullchain.pem privkey.pem; do
  [ -s "$src/$f" ] || { echo "certbot-deploy-hook: $src/$f is missing" >&2; exit 1; }
  mode=0644; [ "$f" = privkey.pem ] && mode=0600
  install -m "$mode" -o "$uid" -g "$uid" "$src/$f" "$dst/.$f.new"
  mv -f "$dst/.$f.new" "$dst/$f"
done

# SIGHUP: the broker re-reads its certificate and key; connected clients stay connected.
compose_dir="${JETMQ_COMPOSE_DIR:-/opt/jetmq}"
node_env="${JETMQ_NODE_ENV:-/etc/jetmq/node.env}"
if command -v docker >/dev/null 2>&1 && [ -f "$compose_dir/compose/node.yml" ]; then
  docker compose -f "$compose_dir/compose/node.yml" --env-file "$node_env" kill -s HUP broker \
    || echo "certbot-deploy-hook: could not signal the broker; it reloads within tls.reload_interval_secs" >&2
fi
echo "certbot-deploy-hook: installed $src into $dst"
