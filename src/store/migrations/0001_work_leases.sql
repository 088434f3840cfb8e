ALTER TABLE "clusters" ADD COLUMN "health" text DEFAULT 'HEALTHY' NOT NULL;--> statement-breakpoint
ALTER TABLE "clusters" ADD COLUMN "health_reason" text DEFAULT '' NOT NULL;--> statement-breakpoint
ALTER TABLE "sessions" ADD COLUMN "last_heard_at" timestamp with time zone DEFAULT now() NOT NULL;