// SPDX-License-Identifier: GPL-2.0-only
/*
 * Reproducer for a QEMU TCG bug (not part of the series): QEMU 7.2's emulated
 * VMRUN does not reload the guest's interrupt shadow from VMCB.int_state, so an
 * interrupt KVM holds back for the shadow of an STI is delivered before the HLT
 * that follows it, and the HLT then sleeps with nothing left to wake it.
 * Build it as a KVM selftest and run it in L1: see kernel/reproducers/README.md.
 */
#include "apic.h"
#include "kvm_util.h"
#include "processor.h"
#include "test_util.h"

#define IPI_VECTOR 0xa0
#define N 20000

static void guest_ipi_handler(struct ex_regs *regs)
{
	x2apic_write_reg(APIC_EOI, 0);
}

static void guest_code(void)
{
	int i;

	x2apic_enable();
	asm volatile("cli");
	for (i = 0; i < N; i++) {
		x2apic_write_reg(APIC_ICR, APIC_DEST_SELF | APIC_INT_ASSERT |
				 APIC_DM_FIXED | IPI_VECTOR);
		asm volatile("sti; hlt; cli");
		if (i % 1000 == 0)
			GUEST_PRINTF("hlt %d\n", i);
	}
	GUEST_DONE();
}

int main(void)
{
	struct kvm_vcpu *vcpu;
	struct kvm_vm *vm;
	struct ucall uc;

	vm = vm_create_with_one_vcpu(&vcpu, guest_code);
	vm_install_exception_handler(vm, IPI_VECTOR, guest_ipi_handler);
	for (;;) {
		vcpu_run(vcpu);
		if (get_ucall(vcpu, &uc) == UCALL_PRINTF) {
			REPORT_GUEST_PRINTF(uc);
			fflush(stdout);
			continue;
		}
		break;
	}
	TEST_ASSERT(uc.cmd == UCALL_DONE, "ucall %lu", uc.cmd);
	printf("1..1\nok 1 %d hlt with a self-IPI pending\n", N);
	return 0;
}
