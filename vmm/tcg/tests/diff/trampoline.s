# Differential-test trampoline (GNU as, intel syntax): the PRE and POST byte arrays of harness.rs
# are the two halves (as --64 -o t.o trampoline.s && objdump -d -M intel t.o).
# State layout: gpr[16] @0, rflags @0x80, mxcsr @0x88, xmm[16] @0x90, ymmh[16] @0x190 (YMM upper
# halves: on AVX hosts harness.rs inserts `vinsertf128 ymmI, ymmI, [rdi+0x190+16*I], 1` after the
# XMM loads and `vextractf128 [rdi+0x190+16*I], ymmI, 1` after POST's xchg; see ymmh_moves). The code page is mapped at
# the fixed address 0x51000000; 0x51001ff0 holds the host RSP, 0x51001ff8 the test's final RSP.
.intel_syntax noprefix
# ---- PRE (followed by the test bytes) ----
pre:
push rbx
push rbp
push r12
push r13
push r14
push r15
sub rsp, 8
stmxcsr [rsp]
push rdi
mov [0x51001ff0], rsp
ldmxcsr [rdi+0x88]
push qword ptr [rdi+0x80]
popfq
.irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
movdqu xmm\i, [rdi+0x90+16*\i]
.endr
mov rax, [rdi+0x00]
mov rcx, [rdi+0x08]
mov rdx, [rdi+0x10]
mov rbx, [rdi+0x18]
mov rbp, [rdi+0x28]
mov rsi, [rdi+0x30]
mov r8, [rdi+0x40]
mov r9, [rdi+0x48]
mov r10, [rdi+0x50]
mov r11, [rdi+0x58]
mov r12, [rdi+0x60]
mov r13, [rdi+0x68]
mov r14, [rdi+0x70]
mov r15, [rdi+0x78]
mov rsp, [rdi+0x20]
mov rdi, [rdi+0x38]
# ---- POST (also where a host fault resumes: the signal handler sets RIP here) ----
post:
mov [0x51001ff8], rsp
mov rsp, [0x51001ff0]
xchg rdi, [rsp]
.irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
movdqu [rdi+0x90+16*\i], xmm\i
.endr
mov [rdi+0x00], rax
mov [rdi+0x08], rcx
mov [rdi+0x10], rdx
mov [rdi+0x18], rbx
mov [rdi+0x28], rbp
mov [rdi+0x30], rsi
mov [rdi+0x40], r8
mov [rdi+0x48], r9
mov [rdi+0x50], r10
mov [rdi+0x58], r11
mov [rdi+0x60], r12
mov [rdi+0x68], r13
mov [rdi+0x70], r14
mov [rdi+0x78], r15
pushfq
pop qword ptr [rdi+0x80]
pop qword ptr [rdi+0x38]
mov rax, [0x51001ff8]
mov [rdi+0x20], rax
stmxcsr [rdi+0x88]
ldmxcsr [rsp]
add rsp, 8
pop r15
pop r14
pop r13
pop r12
pop rbp
pop rbx
cld
ret
