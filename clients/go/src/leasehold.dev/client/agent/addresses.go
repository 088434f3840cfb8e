package agent

// anotherAddress is the index of the address to go to after leaving the one
// at index (taken modulo): one of the other addresses, each as likely, drawn
// with intn (rand.Intn's contract). Entries naming the same address as the
// one left are not others; with no other, it stays. Going to the next one in
// order would move every agent of a server that went away onto one server,
// and a rolling restart of all of them would leave the whole fleet on one.
func anotherAddress(addresses []string, index int, intn func(n int) int) int {
	here := index % len(addresses)
	others := make([]int, 0, len(addresses)-1)
	for i, address := range addresses {
		if address != addresses[here] {
			others = append(others, i)
		}
	}
	if len(others) == 0 {
		return here
	}
	return others[intn(len(others))]
}

// distinctAddresses counts the different addresses in addresses.
func distinctAddresses(addresses []string) int {
	seen := make(map[string]bool, len(addresses))
	for _, address := range addresses {
		seen[address] = true
	}
	return len(seen)
}
