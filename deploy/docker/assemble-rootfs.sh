#!/bin/sh
# Builds the runtime image's whole root file system from a staging folder of binaries: the
# binaries, exactly the shared libraries they load (found with ldd), a non-root user, and the
# folders the replica writes. The runtime stage copies the result onto `scratch`, so the image
# has no shell, no package manager and nothing else to patch.
#
#   assemble-rootfs STAGING_DIR ROOTFS_DIR
set -eu

staging="$1"
rootfs="$2"

mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/tmp" "$rootfs/var/lib/pbft"
for bin in "$staging"/*; do
    [ -f "$bin" ] || continue
    install -m 0755 "$bin" "$rootfs/usr/local/bin/"
done
if [ -z "$(ls "$rootfs/usr/local/bin")" ]; then
    echo "assemble-rootfs: no binaries in $staging" >&2
    exit 1
fi

# Every library the binaries need, plus the dynamic loader, at the same paths.
for bin in "$rootfs"/usr/local/bin/*; do
    ldd "$bin" | awk '/=> \// { print $3 } /^[[:space:]]*\// { print $1 }'
done | sort -u | while read -r lib; do
    cp -L --parents "$lib" "$rootfs/"
done

# uid/gid 65532, the usual "nonroot" of minimal images; Kubernetes manifests pin the same ids.
echo 'root:x:0:0:root:/root:/sbin/nologin' > "$rootfs/etc/passwd"
echo 'pbft:x:65532:65532:pbft:/var/lib/pbft:/sbin/nologin' >> "$rootfs/etc/passwd"
echo 'root:x:0:' > "$rootfs/etc/group"
echo 'pbft:x:65532:' >> "$rootfs/etc/group"
echo 'hosts: files dns' > "$rootfs/etc/nsswitch.conf"
chown 65532:65532 "$rootfs/var/lib/pbft"
chmod 0750 "$rootfs/var/lib/pbft"
chmod 1777 "$rootfs/tmp"
