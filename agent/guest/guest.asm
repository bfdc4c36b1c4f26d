; Ferry test guest: a boot sector that enters 32-bit protected mode and, forever,
; makes passes over a memory region. On pass P it first checks that every page of the
; region still holds the value written on pass P-1 (four words per page), then writes
; the value for pass P, then prints "pass P ok" (or "pass P BAD page 0x...") to COM1.
; The value for pass P at page index I is (I * 0x9E3779B1) XOR P.
;
; Parameters live at fixed offsets before the boot signature, patched by the tests:
;   0x1F0 region start (bytes), 0x1F4 region end (bytes), 0x1F8 delay loop count.
; Build: nasm -f bin -o guest.img guest.asm

BITS 16
ORG 0x7c00

start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    in al, 0x92                 ; fast A20
    or al, 2
    and al, 0xfe
    out 0x92, al
    lgdt [gdt_desc]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp 0x08:pm

BITS 32
pm:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov esp, 0x7000
    mov esi, banner
    call puts
    xor ebp, ebp                ; pass number

pass:
    mov edi, [region_start]
    xor ebx, ebx                ; first bad page address, 0 = none
page:
    mov eax, edi
    shr eax, 12
    imul eax, eax, 0x9E3779B1
    mov edx, eax
    xor edx, ebp                ; value for this pass
    test ebp, ebp
    jz write
    lea ecx, [ebp-1]
    xor eax, ecx                ; value of the previous pass
    cmp [edi], eax
    jne bad
    cmp [edi+1024], eax
    jne bad
    cmp [edi+2048], eax
    jne bad
    cmp [edi+4092], eax
    je write
bad:
    test ebx, ebx
    jnz write
    mov ebx, edi
write:
    mov [edi], edx
    mov [edi+1024], edx
    mov [edi+2048], edx
    mov [edi+4092], edx
    add edi, 4096
    cmp edi, [region_end]
    jb page

    mov esi, msg_pass
    call puts
    mov eax, ebp
    call print_dec
    test ebx, ebx
    jnz report_bad
    mov esi, msg_ok
    call puts
    jmp delay
report_bad:
    mov esi, msg_bad
    call puts
    mov eax, ebx
    call print_hex
    mov al, 10
    call putc
delay:
    mov ecx, [delay_loops]
.spin:
    test ecx, ecx
    jz .done
    dec ecx
    jmp .spin
.done:
    inc ebp
    jmp pass

; al -> COM1, waiting for the transmitter to be empty
putc:
    push edx
    push eax
    mov dx, 0x3fd
.wait:
    in al, dx
    test al, 0x20
    jz .wait
    pop eax
    mov dx, 0x3f8
    out dx, al
    pop edx
    ret

; esi -> NUL-terminated string
puts:
    push eax
.next:
    lodsb
    test al, al
    jz .end
    call putc
    jmp .next
.end:
    pop eax
    ret

; eax in decimal
print_dec:
    pushad
    mov ecx, 10
    xor ebx, ebx
.div:
    xor edx, edx
    div ecx
    add dl, '0'
    push edx
    inc ebx
    test eax, eax
    jnz .div
.out:
    pop eax
    call putc
    dec ebx
    jnz .out
    popad
    ret

; eax in hex, 8 digits
print_hex:
    pushad
    mov ecx, 8
.digit:
    rol eax, 4
    mov ebx, eax
    and eax, 0xf
    mov al, [hexdigits + eax]
    call putc
    mov eax, ebx
    dec ecx
    jnz .digit
    popad
    ret

banner:    db "ferry-guest start", 10, 0
msg_pass:  db "pass ", 0
msg_ok:    db " ok", 10, 0
msg_bad:   db " BAD page 0x", 0
hexdigits: db "0123456789abcdef"

align 8
gdt:
    dq 0
    dq 0x00cf9a000000ffff       ; 0x08 code, flat 4 GiB
    dq 0x00cf92000000ffff       ; 0x10 data, flat 4 GiB
gdt_desc:
    dw gdt_desc - gdt - 1
    dd gdt

times 0x1f0 - ($ - $$) db 0
region_start: dd 0x00100000
region_end:   dd 0x01000000
delay_loops:  dd 0
    dw 0
    dw 0xaa55
