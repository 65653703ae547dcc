/*
 * The rqemu test payload's virtio-blk driver (virtio_blk.c).
 */
#ifndef RQEMU_PAYLOAD_VIRTIO_BLK_H
#define RQEMU_PAYLOAD_VIRTIO_BLK_H

/* Drives the first virtio-blk window and prints its "vblk" line. */
void virtio_blk_test(void);

#endif
