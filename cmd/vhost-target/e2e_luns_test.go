package main

import (
	"fmt"
	"regexp"
	"strings"
	"testing"

	"vhost-target/cmd/vhost-target/guest"
)

// fleetConfig puts five LUNs of both block sizes on one controller: targets
// 0 and 1 with LUN 0 each, and target 2 with LUNs 0, 1 and 3, so Linux must
// find LUN 3 through REPORT LUNS (a sequential scan stops at the gap).
const fleetConfig = targetPrelude + `
[[bdev]]
name = "m512"
type = "malloc"
size = "64MiB"
block_size = 512
[[bdev]]
name = "m4k"
type = "malloc"
size = "128MiB"
block_size = 4096
[[bdev]]
name = "t2l0"
type = "malloc"
size = "16MiB"
block_size = 512
[[bdev]]
name = "t2l1"
type = "malloc"
size = "32MiB"
block_size = 4096
[[bdev]]
name = "t2l3"
type = "malloc"
size = "24MiB"
block_size = 512
[[controller]]
name = "c0"
num_queues = 1
[[controller.lun]]
target = 0
lun = 0
bdev = "m512"
[[controller.lun]]
target = 1
lun = 0
bdev = "m4k"
[[controller.lun]]
target = 2
lun = 0
bdev = "t2l0"
[[controller.lun]]
target = 2
lun = 1
bdev = "t2l1"
[[controller.lun]]
target = 2
lun = 3
bdev = "t2l3"
`

// fleetLUN is what the guest must see for one LUN of fleetConfig.
type fleetLUN struct {
	hctl string // host:channel:target:lun in the guest (host 0: the only HBA)
	bdev string
	size uint64
	bs   int
}

var fleet = []fleetLUN{
	{"0:0:0:0", "m512", 64 << 20, 512},
	{"0:0:1:0", "m4k", 128 << 20, 4096},
	{"0:0:2:0", "t2l0", 16 << 20, 512},
	{"0:0:2:1", "t2l1", 32 << 20, 4096},
	{"0:0:2:3", "t2l3", 24 << 20, 512},
}

// devOf is a guest shell function: the /dev node of a SCSI address.
const devOf = `devof() { echo /dev/$(ls /sys/bus/scsi/devices/$1/block); }
`

// identityScript prints, per disk, its size, block sizes, sysfs identity and
// sg_inq / sg_vpd answers, in a section named after its SCSI address.
const identityScript = shPrelude + `
for d in /sys/block/sd*; do
	n=${d##*/}
	sec "id $(basename "$(readlink $d/device)")"
	echo "size=$(blockdev --getsize64 /dev/$n)"
	echo "lbs=$(cat $d/queue/logical_block_size)"
	echo "pbs=$(cat $d/queue/physical_block_size)"
	echo "vendor=[$(cat $d/device/vendor)]"
	echo "model=[$(cat $d/device/model)]"
	sg_inq /dev/$n
	sg_vpd -p sn /dev/$n
	sg_vpd -p di /dev/$n
done
sec lsblk
lsblk -b -o NAME,HCTL,SIZE,LOG-SEC,PHY-SEC,MODEL
`

// checkIdentity asserts every fleet LUN's identity in one boot's console and
// returns its VPD 0x83 answer by SCSI address.
func checkIdentity(t *testing.T, console string) map[string]string {
	t.Helper()
	secs := sections(console)
	n := 0
	for name := range secs {
		if strings.HasPrefix(name, "id ") {
			n++
		}
	}
	if n != len(fleet) {
		t.Errorf("guest sees %d disks, want %d:\n%s", n, len(fleet), secs["lsblk"])
	}
	di := map[string]string{}
	for _, l := range fleet {
		s := section(t, secs, "id "+l.hctl)
		sn := serialOf(l.bdev)
		wantMatch(t, l.hctl, s,
			fmt.Sprintf(`^size=%d$`, l.size),
			fmt.Sprintf(`^lbs=%d$`, l.bs),
			fmt.Sprintf(`^pbs=%d$`, l.bs),
			`^vendor=\[VHOSTTGT\]$`,
			`^model=\[vhost-target *\]$`,
			`Vendor identification: VHOSTTGT$`,
			`Product identification: vhost-target *$`,
			`Product revision level: 0001$`,
			`version=0x05 +\[SPC-3\]`,
			`Unit serial number: `+sn+`$`, // sg_inq and sg_vpd -p sn
			`designator type: NAA, +code set: Binary\n +`+naaOf(l.bdev)+`$`,
			`designator type: T10 vendor identification, +code set: ASCII\n +vendor id: VHOSTTGT\n +vendor specific: `+sn+`$`,
		)
		if i := strings.Index(s, "Device Identification VPD page:"); i >= 0 {
			di[l.hctl] = s[i:]
		} else {
			t.Errorf("%s: no VPD 0x83 answer", l.hctl)
		}
	}
	return di
}

// TestGuestIdentity (issue 3 a, d): every LUN of a five-LUN controller
// (targets 0, 1 and 2, LUNs 0, 1, 3 on target 2) appears at its address with
// its size, block size, vendor/product, serial and VPD 0x83 designators, and
// a restarted target with the same configuration shows the same designators.
func TestGuestIdentity(t *testing.T) {
	img := guestImage(t)
	tg := startTarget(t, fleetConfig)
	res := runGuest(t, img, guest.Options{
		Controllers: []guest.Controller{{Socket: tg.sock("c0"), NumQueues: 1}},
		Script:      identityScript,
	})
	first := checkIdentity(t, res.Console)
	t.Logf("boot 1:\n%s", sections(res.Console)["lsblk"])
	if t.Failed() {
		t.Fatalf("console:\n%s", res.Console)
	}

	// Same configuration, same socket directory, a new target process state.
	dir := tg.cfg.SocketDir
	tg.Stop()
	tg2 := startTargetWith(t, fleetConfig, targetOpts{dir: dir})
	res = runGuest(t, img, guest.Options{
		Controllers: []guest.Controller{{Socket: tg2.sock("c0"), NumQueues: 1}},
		Script:      identityScript,
	})
	second := checkIdentity(t, res.Console)
	for hctl, d := range first {
		if second[hctl] != d {
			t.Errorf("%s: VPD 0x83 changed across a target restart:\nbefore:\n%s\nafter:\n%s", hctl, d, second[hctl])
		}
	}
	if t.Failed() {
		t.Fatalf("console:\n%s", res.Console)
	}
}

// sgScript runs sg3_utils against a 512-byte and a 4096-byte LUN, then
// checks UNMAP, WRITE SAME (with and without UNMAP) and blkdiscard on each
// by writing a random pattern, punching holes and comparing what reads back
// (direct I/O) with the expected image, zeroes where the LUN reports LBPRZ.
const sgScript = shPrelude + devOf + `
A=$(devof 0:0:0:0)
B=$(devof 0:0:1:0)
C=$(devof 0:0:2:0)
D=$(devof 0:0:2:3)
for x in "512 $A" "4096 $B"; do
	set -- $x
	bs=$1 d=$2
	sec "$bs inq"; sg_inq $d
	for p in 0x00 0x80 0x83 0xb0 0xb1 0xb2; do sec "$bs vpd $p"; sg_vpd -p $p $d; done
	sec "$bs readcap"; sg_readcap -l $d
	sec "$bs readcap10"; sg_readcap $d
	sec "$bs turs"; sg_turs -v $d
	sec "$bs sync"; sg_sync -v $d
	sec "$bs opcodes"; sg_opcodes $d
	sec "$bs opcode 0x42"; sg_opcodes -o 0x42 $d
	sec "$bs provisioning"
	lbprz=$(sg_readcap -l $d | sed -n 's/.*lbprz=\([01]\).*/\1/p')
	echo "lbprz=$lbprz discard_max=$(cat /sys/block/${d#/dev/}/queue/discard_max_bytes)"
	# 64 random blocks at LBA 1000; e is the image they must read back as.
	dd if=/dev/urandom of=/tmp/p bs=$bs count=64 2>/dev/null
	dd if=/tmp/p of=$d bs=$bs seek=1000 oflag=direct 2>/dev/null
	cp /tmp/p /tmp/e
	hole() { # blocks $1..$1+$2-1 of the image become zeroes (LBPRZ=1) ...
		[ "$lbprz" = 1 ] && dd if=/dev/zero of=/tmp/e bs=$bs seek=$1 count=$2 conv=notrunc 2>/dev/null || true
	}
	check() { # ... and the disk must match the image
		dd if=$d of=/tmp/r bs=$bs skip=1000 count=64 iflag=direct 2>/dev/null
		if [ "$lbprz" = 1 ]; then cmp /tmp/r /tmp/e; else
			# without LBPRZ only the untouched blocks are defined
			cmp -n $((10 * bs)) /tmp/r /tmp/e; fi
		echo "$1 ok"
	}
	check write
	sg_unmap -f --lba=1010 --num=8 $d
	hole 10 8
	check sg_unmap
	dd if=/tmp/p of=/tmp/blk bs=$bs skip=63 count=1 2>/dev/null
	sg_write_same --in=/tmp/blk --lba=1020 --num=4 $d
	for i in 20 21 22 23; do dd if=/tmp/blk of=/tmp/e bs=$bs seek=$i conv=notrunc 2>/dev/null; done
	check sg_write_same
	sg_write_same --16 --unmap --lba=1030 --num=4 $d
	dd if=/dev/zero of=/tmp/e bs=$bs seek=30 count=4 conv=notrunc 2>/dev/null
	check sg_write_same_unmap
	blkdiscard -o $((1040 * bs)) -l $((8 * bs)) $d
	hole 40 8
	check blkdiscard
done
sec "luns t0"; sg_luns $A
sec "luns t2"; sg_luns $C
sec "luns t2 lun3"; sg_luns $D
sec "discard all"
# a whole-device discard of the 24 MiB LUN: its last blocks read back as zeroes
dd if=/dev/urandom of=$D bs=512 seek=$((24 * 2048 - 16)) count=16 oflag=direct 2>/dev/null
blkdiscard $D
dd if=$D of=/tmp/r bs=512 skip=$((24 * 2048 - 16)) count=16 iflag=direct 2>/dev/null
dd if=/dev/zero of=/tmp/z bs=512 count=16 2>/dev/null
cmp /tmp/r /tmp/z
echo "discard-all ok"
`

// TestGuestSG (issue 3 c): sg3_utils answers from a 512-byte and a 4096-byte
// LUN, REPORT LUNS per target, and UNMAP / WRITE SAME / blkdiscard results
// read back as the LUN promises.
func TestGuestSG(t *testing.T) {
	img := guestImage(t)
	tg := startTarget(t, fleetConfig)
	res := runGuest(t, img, guest.Options{
		Controllers: []guest.Controller{{Socket: tg.sock("c0"), NumQueues: 1}},
		Script:      sgScript,
	})
	secs := sections(res.Console)
	for _, l := range fleet[:2] {
		bs := l.bs
		p := func(name string) string { return section(t, secs, fmt.Sprintf("%d %s", bs, name)) }
		sn := serialOf(l.bdev)
		wantMatch(t, "sg_inq", p("inq"),
			`Peripheral device type: disk`, `version=0x05`, `HiSUP=1`, `CmdQue=1`,
			`Vendor identification: VHOSTTGT`, `Product identification: vhost-target`,
			`Unit serial number: `+sn)
		wantMatch(t, "VPD 0x00", p("vpd 0x00"),
			`Supported VPD pages \[sv\]`, `Unit serial number \[sn\]`, `Device identification \[di\]`,
			`Block limits \(SBC\) \[bl\]`, `Block device characteristics \(SBC\) \[bdc\]`,
			`Logical block provisioning \(SBC\) \[lbpv\]`)
		wantMatch(t, "VPD 0x80", p("vpd 0x80"), `Unit serial number: `+sn+`$`)
		wantMatch(t, "VPD 0x83", p("vpd 0x83"), `^ +`+naaOf(l.bdev)+`$`, `vendor specific: `+sn+`$`)
		wantMatch(t, "VPD 0xb0", p("vpd 0xb0"),
			`Write same non-zero \(WSNZ\): 1`,
			`Maximum transfer length: [1-9]\d* blocks`,
			`Maximum unmap LBA count: [1-9]\d*`,
			`Maximum unmap block descriptor count: [1-9]\d*`,
			`Maximum write same length: 0x[1-9a-f][0-9a-f]* blocks`)
		wantMatch(t, "VPD 0xb1", p("vpd 0xb1"), `Non-rotating medium`)
		wantMatch(t, "VPD 0xb2", p("vpd 0xb2"),
			`Unmap command supported \(LBPU\): 1`,
			`Write same \(16\) with unmap bit supported \(LBPWS\): 1`,
			`Logical block provisioning read zeros \(LBPRZ\): 1`,
			`Provisioning type: 2 \(thin provisioned\)`)
		blocks := l.size / uint64(bs)
		wantMatch(t, "READ CAPACITY(16)", p("readcap"),
			`lbpme=1, lbprz=1`,
			fmt.Sprintf(`Last LBA=%d \(0x%x\), Number of logical blocks=%d$`, blocks-1, blocks-1, blocks),
			fmt.Sprintf(`Logical block length=%d bytes`, bs),
			fmt.Sprintf(`Device size: %d bytes`, l.size))
		wantMatch(t, "READ CAPACITY(10)", p("readcap10"),
			fmt.Sprintf(`Last LBA=%d \(0x%x\), Number of logical blocks=%d$`, blocks-1, blocks-1, blocks),
			fmt.Sprintf(`Logical block length=%d bytes`, bs))
		wantMatch(t, "sg_turs", p("turs"), `test unit ready cdb: \[00 00 00 00 00 00\]`)
		wantMatch(t, "sg_sync", p("sync"), `synchronize cache\(10\) cdb: \[35 `)
		wantMatch(t, "sg_opcodes", p("opcodes"),
			`^ 00 .*Test Unit Ready`, `^ 12 .*Inquiry`, `^ 28 .*Read\(10\)`, `^ 2a .*Write\(10\)`,
			`^ 35 .*Synchronize cache\(10\)`, `^ 42 .*Unmap`, `^ 93 .*Write same\(16\)`,
			`^ 9e +10 .*Read capacity\(16\)`, `^ a0 .*Report luns`)
		wantMatch(t, "sg_opcodes -o 0x42", p("opcode 0x42"), `Command is supported`)
		wantMatch(t, "provisioning", p("provisioning"),
			`^lbprz=1 discard_max=[1-9]`, `^write ok$`, `^sg_unmap ok$`, `^sg_write_same ok$`,
			`^sg_write_same_unmap ok$`, `^blkdiscard ok$`)
	}
	lunList := func(s string) []string { return regexp.MustCompile(`(?m)^ +([0-9a-f]{16})$`).FindAllString(s, -1) }
	if got := lunList(section(t, secs, "luns t0")); len(got) != 1 || strings.TrimSpace(got[0]) != "0000000000000000" {
		t.Errorf("REPORT LUNS on target 0 = %q, want LUN 0 only", got)
	}
	for _, name := range []string{"luns t2", "luns t2 lun3"} {
		got := lunList(section(t, secs, name))
		for i := range got {
			got[i] = strings.TrimSpace(got[i])
		}
		want := []string{"0000000000000000", "0001000000000000", "0003000000000000"}
		if strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	wantMatch(t, "discard all", section(t, secs, "discard all"), `^discard-all ok$`)

	// The target saw the discards as UNMAP (or WRITE SAME with UNMAP) commands.
	for _, l := range tg.ctrl("c0").Stats.Snapshot().LUNs {
		if l.Bdev == "m512" || l.Bdev == "m4k" || l.Bdev == "t2l3" {
			if l.Unmaps == 0 {
				t.Errorf("LUN %d/%d (%s): no unmaps counted", l.Target, l.LUN, l.Bdev)
			}
		}
	}
	if t.Failed() {
		t.Logf("console:\n%s", res.Console)
	}
}

// TestGuestFio (issue 3 b): fio write-then-verify (crc32c) with libaio and
// io_uring at the edges of the matrix: block sizes from the LUN's block size
// to 1 MiB (and random sizes in between), queue depths 1 to 64, on both
// block sizes and on LUN 3 of target 2.
func TestGuestFio(t *testing.T) {
	img := guestImage(t)
	tg := startTarget(t, fleetConfig)
	type job struct {
		hctl, engine, bs string
		qd               int
		size, rw         string
	}
	jobs := []job{
		{"0:0:0:0", "libaio", "512", 1, "1m", "randwrite"},
		{"0:0:0:0", "io_uring", "512", 64, "4m", "randwrite"},
		{"0:0:0:0", "io_uring", "1m", 16, "32m", "write"},
		{"0:0:0:0", "libaio", "512-1m", 32, "16m", "randwrite"},
		{"0:0:1:0", "io_uring", "4k", 1, "2m", "randwrite"},
		{"0:0:1:0", "libaio", "4k", 64, "16m", "randwrite"},
		{"0:0:1:0", "libaio", "1m", 4, "32m", "randwrite"},
		{"0:0:1:0", "io_uring", "4k-1m", 64, "32m", "randwrite"},
		{"0:0:2:3", "io_uring", "4k", 8, "4m", "randwrite"},
		{"0:0:2:1", "libaio", "64k", 16, "8m", "randwrite"},
	}
	var sb strings.Builder
	sb.WriteString(shPrelude + devOf)
	for i, j := range jobs {
		bsFlag := "--bs=" + j.bs
		if strings.Contains(j.bs, "-") {
			bsFlag = "--bsrange=" + j.bs
		}
		fmt.Fprintf(&sb, "sec fio%d\nfio --name=j%d --filename=$(devof %s) --ioengine=%s --direct=1 --rw=%s %s --iodepth=%d --size=%s --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3\n",
			i, i, j.hctl, j.engine, j.rw, bsFlag, j.qd, j.size)
	}
	res := runGuest(t, img, guest.Options{
		Controllers: []guest.Controller{{Socket: tg.sock("c0"), NumQueues: 1}},
		Script:      sb.String(),
	})
	secs := sections(res.Console)
	for i, j := range jobs {
		s := section(t, secs, fmt.Sprintf("fio%d", i))
		// terse v3: field 5 is the error number.
		f := strings.Split(strings.TrimSpace(s), ";")
		if len(f) < 5 || f[0] != "3" || f[4] != "0" {
			t.Errorf("fio job %d %+v: terse output %q", i, j, s)
		}
	}
	for _, l := range tg.ctrl("c0").Stats.Snapshot().LUNs {
		if l.Bdev == "t2l0" {
			continue
		}
		if l.Writes == 0 || l.Reads == 0 || l.Errors != [len(l.Errors)]uint64{} {
			t.Errorf("LUN %d/%d (%s): %+v", l.Target, l.LUN, l.Bdev, l.LUNCounters)
		}
	}
	if t.Failed() {
		t.Logf("console:\n%s", res.Console)
	}
}
