# Guest test code for tests/system.rs, linked at 0x10000 (see build.sh; the bytes are
# embedded in tests/system/image.rs).
.intel_syntax noprefix
.code64
.globl _start
_start:

# --- common exception handler: [rsp] = vector, [rsp+8] = error code, then the frame ---
common:
    mov rax, [rsp]
    mov [0x9000], rax
    mov rax, [rsp+8]
    mov [0x9008], rax
    mov rax, [rsp+16]
    mov [0x9010], rax
    mov rax, [rsp+24]
    mov [0x9018], rax
    mov rax, [rsp+40]
    mov [0x9020], rax
    mov rax, cr2
    mov [0x9028], rax
    mov [0x9030], rsp
    hlt

# --- syscall entry (LSTAR): log RAX, return with RAX+1 ---
sys_entry:
    mov [0x9100], rax
    mov [0x9108], rcx
    inc rax
    sysretq

pf_read:
    mov rax, [0x50008]
    hlt
pf_write_ro:
    mov [0x51000], rax
    hlt
pf_push:
    mov rsp, 0x50010
    push rax
    hlt
div0:
    xor ecx, ecx
    div ecx
    hlt
undef:
    ud2
    hlt
to_user:
    push 0x2b
    push 0x31000
    push 0x2
    push 0x33
    lea rax, [rip + user_code]
    push rax
    iretq
user_code:
    mov rax, 41
    syscall
    mov [0x30800], rax
    int 0x80
    hlt
to_user_gp:
    push 0x2b
    push 0x31000
    push 0x2
    push 0x33
    lea rax, [rip + user_code2]
    push rax
    iretq
user_code2:
    mov rbx, [0x40000]
    hlt
to_user_int81:
    push 0x2b
    push 0x31000
    push 0x2
    push 0x33
    lea rax, [rip + user_code3]
    push rax
    iretq
user_code3:
    int 0x81
    hlt
triple:
    lidt [rip + empty_idt]
    ud2
empty_idt:
    .word 0
    .quad 0
wait_irq:
    sti
    hlt
    hlt
smc:
    mov byte ptr [rip + smc_target + 1], 7
    nop
smc_target:
    mov eax, 1
    hlt

# --- checksum program: sum over f(i) for a buffer, with calls ---
program:
    mov rsp, 0x70000
    lea rdi, [0x80000]
    mov ecx, 4096
    xor eax, eax
fill:
    mov [rdi + rcx - 1], cl
    imul eax, ecx, 0x45
    xor [rdi + rcx - 1], al
    loop fill
    mov rsi, 0x80000
    mov edx, 4096
    call checksum
    mov [0x9200], rax
    mov ecx, 20
    call fib
    mov [0x9208], rax
    hlt
checksum:                      # rsi = buf, rdx = len -> rax = fletcher-like sum
    push rbx
    xor eax, eax
    xor ebx, ebx
1:  movzx r8d, byte ptr [rsi]
    add rax, r8
    add rbx, rax
    rol rbx, 3
    inc rsi
    dec rdx
    jnz 1b
    xor rax, rbx
    pop rbx
    ret
fib:                           # rcx = n -> rax = fib(n), recursive
    cmp rcx, 2
    jae 2f
    mov rax, rcx
    ret
2:  push rcx
    dec rcx
    call fib
    push rax
    mov rcx, [rsp + 8]
    sub rcx, 2
    call fib
    pop rdx
    add rax, rdx
    pop rcx
    ret

# --- MMIO and port I/O through the Platform (0x1FF000 maps guest-physical 0xFEE00000) ---
mmio_io:
    mov eax, [0x1FF020]
    mov [0x1FF0B0], eax
    mov dx, 0x3f8
    mov al, 0x41
    out dx, al
    in al, 0x71
    mov [0x9300], al
    mov rsi, 0x1FF000
    movdqu xmm0, [rsi+0x10]
    mov rdi, 0x1FF100
    mov ecx, 3
    rep stosb
    hlt

# --- TLB maintenance: INVLPG and CR3 reload pick up PTE changes; global pages survive ---
tlb_test:
    mov rax, [0x52000]
    mov qword ptr [0x4000 + 0x52 * 8], 0x53003
    invlpg [0x52000]
    mov rbx, [0x52000]
    mov qword ptr [0x4000 + 0x52 * 8], 0x52003
    mov rcx, cr3
    mov cr3, rcx
    mov rdx, [0x52000]
    mov rsi, [0x54000]
    mov qword ptr [0x4000 + 0x54 * 8], 0x53003
    mov cr3, rcx
    mov rdi, [0x54000]
    hlt

# --- tight loop for the MIPS measurement ---
bench:
    mov rcx, r15
3:  add rax, rcx
    xor rdx, rax
    dec rcx
    jnz 3b
    hlt
